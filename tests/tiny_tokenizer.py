"""A byte-level BPE tokenizer trained in-process on a few sentences: no hub, no download."""
import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = [
    "A user watched these movies, oldest first. Candidate movies. Which candidate will the user watch next?",
    "Reply with its title. Answer: Toy Story, Heat, Alien, The Matrix, Star Wars, Fargo, Casablanca",
    "listened artists played games music film next choose from list name the one most likely",
]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
