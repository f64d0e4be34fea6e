"""P2Rec (Liu et al., "A Practice-Friendly LLM-Enhanced Paradigm with Preference Parsing for Sequential
Recommendation", arXiv 2406.00333). Only the abstract is public; the design here is ours, kept to it:

1. Information reconstruction (`reconstruct.py`, stage `p2rec_reconstruct`): a user-level SFT task that
   teaches the LLM to parse a user's preference from the titles of their sequence. The target is the
   pretrained SASRec's own view of that user: its next-item distribution summed over K latent item
   categories (k-means on SASRec's item table). Loss KL(prior || head(pooled LLM state)); LoRA + head.
2. Information augmentation (`augment.py`, stage `p2rec_augment`): the tuned LLM embeds every item once
   (cached); the embeddings are reduced to SASRec's width and initialise, or are added to, the item
   table of a new SASRec trained as usual. The LLM is not needed at serving time.
3. Evaluation: SASRec vs SASRec + P2Rec on the same splits, overall and on cold items (`compare.py`).
"""
