"""Unified prompts (spec §3) as token arrays with the masks the losses need.

A prompt is built from pieces tokenized one by one, so the history span, the ID slots and the answer
span are known exactly (no offset bookkeeping on a finished string):

    <template text> <title> [IID], <title> [IID], ... <template text> <cand> [IID], ... <text> | <answer>\n

Text-ID rendering writes each item as its title followed by an ID slot token (optionally preceded by
a marker token); text-only rendering writes the title alone. The slot token is never looked up in the
LLM's table: the model puts projector(E_rec[item]) there (models/rsllm.py). Added tokens get ids
just past the LLM's vocabulary (vocab_size + k); they are also registered with the tokenizer so
decoded prompts show them.

Static shapes: examples are padded to the smallest of a few length buckets that fits the batch, so
XLA compiles one program per bucket, not one per batch.
"""
from __future__ import annotations

import dataclasses
import string
from collections.abc import Sequence

import numpy as np

IID_TOKEN = "[IID]"
MARKER_TOKEN = "[ITEM]"
UID_TOKEN = "[UID]"  # the user slot: SASRec's state after the history, projected (config.prompts.user_slot)
USER_SLOT_TEXT = ", profile"  # written before the user slot, after the last history item

# Three templates per domain, our own wording. {history} and {candidates} are replaced by item lists.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "movie": (
        "A user watched these movies, oldest first: {history}. Candidate movies: {candidates}. "
        "Which candidate will the user watch next? Reply with its title.\nAnswer:",
        "Viewing history (in order): {history}.\nChoose the next movie this viewer will watch from: "
        "{candidates}.\nNext movie:",
        "Here are the films someone has seen recently: {history}. From this list: {candidates}, name "
        "the one film they are most likely to watch next.\nThe film is:",
    ),
    "music": (
        "A user listened to these artists, oldest first: {history}. Candidate artists: {candidates}. "
        "Which candidate will the user listen to next? Reply with the artist's name.\nAnswer:",
        "Listening history (in order): {history}.\nChoose the next artist this listener will play from: "
        "{candidates}.\nNext artist:",
        "Here are the artists someone played recently: {history}. From this list: {candidates}, name "
        "the one artist they are most likely to play next.\nThe artist is:",
    ),
    "game": (
        "A user played these games, oldest first: {history}. Candidate games: {candidates}. "
        "Which candidate will the user play next? Reply with its title.\nAnswer:",
        "Gaming history (in order): {history}.\nChoose the next game this player will pick up from: "
        "{candidates}.\nNext game:",
        "Here are the games someone has played recently: {history}. From this list: {candidates}, name "
        "the one game they are most likely to play next.\nThe game is:",
    ),
}
DOMAIN_OF_DATASET = {"movielens": "movie", "lastfm": "music", "lastfm_raw": "music", "steam": "game", "custom": "movie"}

# Per-example arrays, padded per batch. Fill values for padding.
PAD_VALUES = dict(input_ids=0, attention_mask=0, slot_items=-1, labels=0, loss_mask=0, history_mask=0,
                  answer_mask=0, user_slot=0, segment_ids=0, positions=0)


# Length buckets 32 tokens apart around LLaRA-sized prompts (10 history + 20 candidates: 220-310 tokens
# with SmolLM2's tokenizer), configs/base.py's config.prompts.buckets: half the padded tokens of
# (256, 384, ...) on MovieLens for one more compile (benchmarks/padding.py, docs/benchmarks.md).
FINE_BUCKETS = (128, 160, 192, 224, 256, 288, 320, 352, 384, 448, 512, 640, 768, 1024)


@dataclasses.dataclass(frozen=True)
class PromptSettings:
    domain: str = "movie"
    item_separator: str = ", "
    use_marker: bool = False  # put MARKER_TOKEN before each ID slot (ours)
    buckets: tuple[int, ...] = FINE_BUCKETS
    target_len: int = 24  # the second tower's input (target item alone), padded to this
    use_titles: bool = True  # False = ID slots only in history/candidates (an ablation; answers stay titles)
    chat_template: str = "off"  # on | off | auto (on when the tokenizer has one): wrap as a user turn
    # One slot after the history holding SASRec's user state (unified prompts only): "..., profile [UID]".
    user_slot: bool = False


_SENTINEL = "\x00RSLLM_PROMPT\x00"


def chat_wrapping(tokenizer, mode: str) -> tuple[str, str] | None:
    """(text before, text after) the user's message in the tokenizer's chat template, or None.

    Instruct models (SmolLM2-Instruct, Llama-*-chat) answer a bare completion prompt with EOS; wrapped
    as a user turn followed by the assistant header they answer. The template is rendered once around
    a sentinel so the prompt pieces keep being tokenized one by one.
    """
    if mode not in ("on", "off", "auto"):
        raise ValueError(f"config.prompts.chat_template must be on, off or auto, got {mode!r}")
    has = bool(getattr(tokenizer, "chat_template", None))
    if mode == "off" or (mode == "auto" and not has):
        return None
    if not has:
        raise ValueError("config.prompts.chat_template='on' but the tokenizer has no chat template: "
                         "use 'off' (plain completion prompts) or a chat/instruct checkpoint")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    before, sep, after = text.partition(_SENTINEL)
    if not sep:
        raise ValueError("the tokenizer's chat template does not reproduce the user message verbatim")
    return before, after


class PromptBuilder:
    """Turns (history, candidates, target) item ids into token ids + masks. Pure given the tokenizer."""

    def __init__(self, tokenizer, titles: Sequence[str], vocab_size: int, settings: PromptSettings):
        if not settings.use_titles and settings.use_marker:
            raise ValueError("config.prompts.use_titles=False with use_marker=True: the marker would be the only text")
        if settings.domain not in TEMPLATES:
            raise ValueError(f"prompt domain {settings.domain!r} is not one of {sorted(TEMPLATES)}")
        self.tok = tokenizer
        self.titles = list(titles)
        self.settings = settings
        self.iid_id = vocab_size  # ids past the LLM's vocabulary: rows of RSLLM.added_embeddings
        self.marker_id = vocab_size + 1
        self.num_added_tokens = 2  # rows of RSLLM.added_embeddings
        # The user slot's id: never looked up (the model writes the projected user state there).
        self.uid_id = vocab_size + 2
        self.bos = [tokenizer.bos_token_id] if getattr(tokenizer, "bos_token_id", None) is not None else []
        self.chat = chat_wrapping(tokenizer, settings.chat_template)
        if self.chat and tokenizer.bos_token and self.chat[0].startswith(tokenizer.bos_token):
            self.bos = []  # the template writes BOS itself
        self._cache: dict[str, list[int]] = {}
        self.templates = [self._parse(t) for t in TEMPLATES[settings.domain]]

    @staticmethod
    def _parse(template: str) -> list[tuple[str, str | None]]:
        # Each item list starts with its own leading space (tokenized with the first title), so the
        # literal before it drops its trailing space: "first: Heat", not "first:  Heat".
        return [(lit[:-1] if field and lit.endswith(" ") else lit, field)
                for lit, field, _, _ in string.Formatter().parse(template)]

    def encode_text(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def _item_pieces(self, item: int, use_ids: bool, leading: str) -> tuple[list[int], list[int]]:
        if use_ids and not self.settings.use_titles:  # "..., [IID], [IID]": the ID is all the model sees
            text = leading.rstrip()
            ids = self.encode_text(text) if text else []
        else:
            ids = self.encode_text(leading + self.titles[item])
        slots = [-1] * len(ids)
        if use_ids:
            if self.settings.use_marker:
                ids, slots = ids + [self.marker_id], slots + [-1]
            ids, slots = ids + [self.iid_id], slots + [item]
        return ids, slots

    def _items(self, items: Sequence[int], use_ids: bool) -> tuple[list[int], list[int]]:
        ids, slots = [], []
        for i, item in enumerate(items):
            # The separator is tokenized with the title, so each title is tokenized exactly as it
            # would be inside the finished string (a leading space, not a fresh word boundary).
            lead = " " if i == 0 else self.settings.item_separator
            a, b = self._item_pieces(item, use_ids, lead)
            ids += a
            slots += b
        return ids, slots

    def render(self, history: Sequence[int], candidates: Sequence[int], target: int | None,
               template: int, use_ids: bool) -> dict[str, np.ndarray]:
        """One example. `target` None -> prompt only (generation); else prompt + answer + labels."""
        ids, slots, hist = list(self.bos), [-1] * len(self.bos), [0] * len(self.bos)
        user_at = -1
        pieces = list(self.templates[template])
        if self.chat:
            pieces = [(self.chat[0], None)] + pieces + [(self.chat[1], None)]
        for literal, field in pieces:
            if literal:
                t = self.encode_text(literal)
                ids, slots, hist = ids + t, slots + [-1] * len(t), hist + [0] * len(t)
            if field == "history":
                t, s = self._items(history, use_ids)
                ids, slots, hist = ids + t, slots + s, hist + [1] * len(t)
                if use_ids and self.settings.user_slot:
                    t = self.encode_text(USER_SLOT_TEXT) + [self.uid_id]
                    ids, slots, hist = ids + t, slots + [-1] * len(t), hist + [1] * len(t)
                    user_at = len(ids) - 1
            elif field == "candidates":
                t, s = self._items(candidates, use_ids)
                ids, slots, hist = ids + t, slots + s, hist + [0] * len(t)
        prompt_len = len(ids)
        answer = [] if target is None else self.answer_ids(target)
        ids, slots, hist = ids + answer, slots + [-1] * len(answer), hist + [0] * len(answer)
        answer_mask = [0] * prompt_len + [1] * len(answer)
        out = dict(
            input_ids=np.asarray(ids, np.int32), attention_mask=np.ones(len(ids), np.int32),
            slot_items=np.asarray(slots, np.int32), history_mask=np.asarray(hist, np.int32),
            answer_mask=np.asarray(answer_mask, np.int32),
        )
        if len(ids) > max(self.settings.buckets):
            self._too_long(len(ids), [*history, *candidates, *([] if target is None else [target])])
        if self.settings.user_slot:
            out["user_slot"] = (np.arange(len(ids)) == user_at).astype(np.int32)
        # Position t predicts token t+1; the loss counts only predictions of answer tokens.
        out["labels"] = np.append(out["input_ids"][1:], 0).astype(np.int32)
        out["loss_mask"] = np.append(out["answer_mask"][1:], 0).astype(np.int32)
        return out

    def pack_answers(self, ex: dict[str, np.ndarray], target: int, negatives: Sequence[int],
                     answer_tokens: int) -> dict[str, np.ndarray]:
        """A training example with the answers of `negatives` packed after the target's (listwise loss).

        Each answer is a segment that attends to the prompt (segment 0) and its own earlier tokens only,
        its positions continuing the prompt's, so the prompt and the target's answer compute exactly
        what they compute unpacked (NIP and the towers are unchanged) and each candidate's tokens are
        scored as if it were the answer. Returns `ex` with `segment_ids`, `positions` and, per
        candidate (target first) the first `answer_tokens` answer tokens to score: `lw_pred` (the
        position whose logits predict the token), `lw_label`, `lw_mask` [1 + N, answer_tokens];
        `lw_valid` [1 + N] is 0 for a negative whose answer is the target's (a duplicate title)."""
        prompt_len = int(np.argmax(ex["answer_mask"])) if ex["answer_mask"].any() else len(ex["input_ids"])
        target_ids = self.answer_ids(target)
        n = len(ex["input_ids"])
        seg = np.zeros(n, np.int32)
        seg[prompt_len:] = 1
        pos = np.arange(n, dtype=np.int32)
        k, a = 1 + len(negatives), answer_tokens
        pred, label, mask = (np.zeros((k, a), np.int32) for _ in range(3))
        valid = np.ones(k, np.int32)
        packed_ids, packed_seg, packed_pos = [], [], []
        for c, item in enumerate([target, *negatives]):
            ids = (target_ids if c == 0 else self.answer_ids(item))[:a]
            start = prompt_len if c == 0 else n + len(packed_ids)  # the answer's first slot in the row
            if c > 0:
                valid[c] = int(ids != target_ids[:a])
                packed_ids += ids
                packed_seg += [c + 1] * len(ids)
                packed_pos += range(prompt_len, prompt_len + len(ids))
            # Token j is predicted by the prompt's last position (j = 0) or by the answer's token j - 1.
            pred[c, : len(ids)] = [prompt_len - 1] + list(range(start, start + len(ids) - 1))
            label[c, : len(ids)] = ids
            mask[c, : len(ids)] = 1
        m = len(packed_ids)
        out = dict(ex)
        out["input_ids"] = np.concatenate([ex["input_ids"], np.asarray(packed_ids, np.int32)])
        for key, fill in (("attention_mask", 1), ("slot_items", -1), ("history_mask", 0), ("answer_mask", 0),
                          ("loss_mask", 0), ("user_slot", 0)):
            if key in ex:
                out[key] = np.concatenate([ex[key], np.full(m, fill, ex[key].dtype)])
        out["labels"] = np.append(out["input_ids"][1:], 0).astype(np.int32)  # loss_mask keeps NIP on the target
        out["segment_ids"] = np.concatenate([seg, np.asarray(packed_seg, np.int32)])
        out["positions"] = np.concatenate([pos, np.asarray(packed_pos, np.int32)])
        out.update(lw_pred=pred, lw_label=label, lw_mask=mask, lw_valid=valid)
        if len(out["input_ids"]) > max(self.settings.buckets):
            raise ValueError(f"a prompt with {len(negatives)} packed candidate answers has {len(out['input_ids'])} "
                             f"tokens, past the largest length bucket {max(self.settings.buckets)}: lower "
                             "config.loss.listwise_negatives or config.loss.listwise_answer_tokens")
        return out

    def _too_long(self, n: int, items: Sequence[int]) -> None:
        """A prompt past the largest bucket: name the item whose title is longest, the usual cause."""
        longest = max(items, key=lambda i: len(self.encode_text(" " + self.titles[i])))
        title = self.titles[longest]
        raise ValueError(
            f"a prompt of {n} tokens exceeds the largest length bucket {max(self.settings.buckets)} "
            f"(config.prompts.buckets); its longest title is item index {longest} "
            f"({len(self.encode_text(' ' + title))} tokens, {len(title)} characters: "
            f"{title[:60]!r}{'...' if len(title) > 60 else ''}): shorten that title in the items file, "
            "or add a larger bucket / lower config.data.max_history")

    def answer_ids(self, item: int) -> list[int]:
        """The answer tokens the LM is trained on for `item` (title and the newline that ends it)."""
        # A completion continues "Answer:" after a space; a chat reply starts a fresh assistant turn.
        lead = "" if self.chat else " "
        return self.encode_text(lead + self.titles[item] + "\n")

    def render_target(self, item: int, use_ids: bool) -> dict[str, np.ndarray]:
        """Second tower input: the target item alone (`<title> [IID]`, or `<title>` text-only)."""
        ids, slots = self._item_pieces(item, use_ids, " ")
        n = self.settings.target_len
        if len(ids) > n:  # cut the title, never the ID slot (and marker) at its end
            tail = (1 + self.settings.use_marker) if use_ids else 0
            ids, slots = ids[: n - tail] + ids[len(ids) - tail:], slots[: n - tail] + slots[len(slots) - tail:]
        pad = self.settings.target_len - len(ids)
        return dict(
            target_input_ids=np.asarray(ids + [0] * pad, np.int32),
            target_attention_mask=np.asarray([1] * len(ids) + [0] * pad, np.int32),
            target_slot_items=np.asarray(slots + [-1] * pad, np.int32),
        )


def bucket_length(n: int, buckets: Sequence[int]) -> int:
    for b in sorted(buckets):
        if n <= b:
            return b
    raise ValueError(
        f"a prompt of {n} tokens exceeds the largest length bucket {max(buckets)}: add a larger value "
        "to config.prompts.buckets (or shorten titles / config.data.max_history)"
    )


def pad_batch(examples: Sequence[dict], buckets: Sequence[int], left: bool = False) -> dict[str, np.ndarray]:
    """Stack variable-length examples, padding sequence fields to one bucket length. Left padding is
    for generation (every prompt ends at the same column); training pads on the right."""
    length = bucket_length(max(len(e["input_ids"]) for e in examples), buckets)
    out: dict[str, list] = {}
    for e in examples:
        for k, v in e.items():
            if k in PAD_VALUES:
                pad = np.full(length - len(v), PAD_VALUES[k], v.dtype)
                v = np.concatenate([pad, v] if left else [v, pad])
            out.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}


def repad(batch: dict[str, np.ndarray], length: int, left: bool = False) -> dict[str, np.ndarray]:
    """Pad a padded batch's sequence fields further to `length` (hosts agreeing on one bucket)."""
    out = dict(batch)
    for k, fill in PAD_VALUES.items():
        if k in batch and batch[k].shape[1] < length:
            v = batch[k]
            pad = np.full((v.shape[0], length - v.shape[1]), fill, v.dtype)
            out[k] = np.concatenate([pad, v] if left else [v, pad], axis=1)
    return out
