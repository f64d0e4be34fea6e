"""Prompt rendering: slots, spans, labels, buckets."""
import numpy as np
import pytest

from rsllm_jax.data.prompts import PromptBuilder, PromptSettings, bucket_length, pad_batch
from tiny_tokenizer import tiny_tokenizer

TITLES = ["Toy Story", "Heat", "Alien", "The Matrix", "Star Wars", "Fargo", "Casablanca"]
V = 1000  # pretend LLM vocabulary size


def _builder(**kw):
    return PromptBuilder(tiny_tokenizer(), TITLES, V, PromptSettings(domain="movie", **kw))


def test_text_id_slots_sit_after_each_title_and_carry_the_item():
    b = _builder()
    ex = b.render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    slots = ex["slot_items"]
    assert list(slots[slots >= 0]) == [0, 1, 2, 3, 4, 5, 6]
    assert np.all(ex["input_ids"][slots >= 0] == b.iid_id)
    assert np.all(ex["input_ids"][slots < 0] < V)
    # The token before each slot ends the item's title.
    tok = tiny_tokenizer()
    first_slot = int(np.argmax(slots >= 0))
    assert tok.decode(ex["input_ids"][1:first_slot]).endswith("Toy Story")


def test_history_and_answer_spans_and_labels():
    b = _builder()
    tok = tiny_tokenizer()
    ex = b.render([0, 1, 2], [3, 4, 5, 6], target=4, template=1, use_ids=True)
    hist_tokens = ex["input_ids"][ex["history_mask"] == 1]
    assert tok.decode([t for t in hist_tokens if t < V]).strip() == "Toy Story, Heat, Alien"
    assert tok.decode(ex["input_ids"][ex["answer_mask"] == 1]) == " Star Wars\n"
    # labels are the next token; the loss counts exactly the answer tokens.
    np.testing.assert_array_equal(ex["labels"][:-1], ex["input_ids"][1:])
    assert ex["loss_mask"].sum() == ex["answer_mask"].sum()
    np.testing.assert_array_equal(ex["labels"][ex["loss_mask"] == 1], ex["input_ids"][ex["answer_mask"] == 1])


def test_text_only_has_no_slots_and_marker_option_adds_one_token_per_item():
    ex = _builder().render([0, 1, 2], [3, 4, 5, 6], target=4, template=2, use_ids=False)
    assert np.all(ex["slot_items"] == -1) and np.all(ex["input_ids"] < V)
    b = _builder(use_marker=True)
    ex_m = b.render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    ex_n = _builder().render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    assert len(ex_m["input_ids"]) == len(ex_n["input_ids"]) + 7
    assert (ex_m["input_ids"] == b.marker_id).sum() == 7


def test_target_tower_input():
    b = _builder()
    t = b.render_target(3, use_ids=True)
    n = t["target_attention_mask"].sum()
    assert t["target_input_ids"].shape == (24,)
    assert t["target_input_ids"][n - 1] == b.iid_id and t["target_slot_items"][n - 1] == 3
    assert tiny_tokenizer().decode(t["target_input_ids"][: n - 1]) == " The Matrix"


def test_buckets_and_padding():
    assert bucket_length(10, (8, 16, 32)) == 16
    with pytest.raises(ValueError, match="config.prompts.buckets"):
        bucket_length(40, (8, 16, 32))
    b = _builder(buckets=(64, 128, 256))
    exs = [b.render([0, 1, 2], [3, 4], 4, 0, True), b.render([0, 1, 2, 5, 6], [3, 4], 4, 0, True)]
    right = pad_batch(exs, (64, 128, 256))
    left = pad_batch(exs, (64, 128, 256), left=True)
    assert right["input_ids"].shape[1] in (64, 128, 256)
    n0 = len(exs[0]["input_ids"])
    np.testing.assert_array_equal(right["input_ids"][0, :n0], exs[0]["input_ids"])
    np.testing.assert_array_equal(left["input_ids"][0, -n0:], exs[0]["input_ids"])
    assert right["slot_items"][0, n0:].tolist() == [-1] * (right["input_ids"].shape[1] - n0)


def test_long_target_titles_are_cut_but_keep_their_slot():
    b = _builder(target_len=4)
    t = b.render_target(3, use_ids=True)
    assert t["target_attention_mask"].sum() == 4
    assert t["target_input_ids"][3] == b.iid_id and t["target_slot_items"][3] == 3


CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}")


def _chat_tokenizer():
    import copy
    tok = copy.deepcopy(tiny_tokenizer())
    tok.chat_template = CHAT_TEMPLATE
    return tok


def test_chat_template_wraps_the_prompt_and_answers_as_the_assistant():
    tok = _chat_tokenizer()
    plain = PromptBuilder(tok, TITLES, V, PromptSettings(chat_template="off"))
    chat = PromptBuilder(tok, TITLES, V, PromptSettings(chat_template="auto"))
    assert plain.chat is None and chat.chat is not None
    p = plain.render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    c = chat.render([0, 1, 2], [3, 4, 5, 6], target=4, template=0, use_ids=True)
    text = tok.decode([t if t < V else tok.eos_token_id for t in c["input_ids"]])
    assert "<|endoftext|>user\nA user watched" in text
    prompt_text = tok.decode([t for t, a in zip(c["input_ids"], c["answer_mask"]) if not a and t < V])
    assert prompt_text.endswith("\n<|endoftext|>assistant\n")
    # The reply is the bare title (no leading space) + newline; slots are the same items in order.
    assert tok.decode(c["input_ids"][c["answer_mask"] == 1]) == "Star Wars\n"
    np.testing.assert_array_equal(c["slot_items"][c["slot_items"] >= 0], p["slot_items"][p["slot_items"] >= 0])
    assert c["history_mask"].sum() == p["history_mask"].sum()


def test_chat_template_on_without_one_is_an_error():
    with pytest.raises(ValueError, match="no chat template"):
        PromptBuilder(tiny_tokenizer(), TITLES, V, PromptSettings(chat_template="on"))
    with pytest.raises(ValueError, match="on, off or auto"):
        PromptBuilder(tiny_tokenizer(), TITLES, V, PromptSettings(chat_template="yes"))


def test_no_double_space_before_item_lists():
    tok = tiny_tokenizer()
    ex = _builder().render([0, 1], [2, 3], target=None, template=0, use_ids=False)
    text = tok.decode(ex["input_ids"])
    assert "first: Toy Story, Heat. Candidate movies: Alien" in text, text


def test_id_only_rendering_keeps_slots_and_drops_titles():
    tok = tiny_tokenizer()
    b = _builder(use_titles=False)
    ex = b.render([0, 1, 2], [3, 4], target=4, template=0, use_ids=True)
    slots = ex["slot_items"]
    assert list(slots[slots >= 0]) == [0, 1, 2, 3, 4]
    prompt = tok.decode([t for t, a in zip(ex["input_ids"], ex["answer_mask"]) if t < V and not a])
    assert "Toy Story" not in prompt and "Heat" not in prompt
    assert tok.decode(ex["input_ids"][ex["answer_mask"] == 1]) == " Star Wars\n"  # answers stay titles
    # The text-only rendering is unaffected by the option.
    t = b.render([0, 1, 2], [3, 4], target=4, template=0, use_ids=False)
    assert "Toy Story" in tok.decode(t["input_ids"])


def test_a_prompt_past_the_largest_bucket_names_the_long_title():
    titles = list(TITLES)
    titles[2] = "word " * 2000  # a 10,000-character title in the items file
    b = PromptBuilder(tiny_tokenizer(), titles, V, PromptSettings(domain="movie"))
    with pytest.raises(ValueError, match=r"item index 2 .*10000 characters.*shorten that title"):
        b.render([0, 1, 2], [0, 1], target=1, template=0, use_ids=True)
    b.render([0, 1], [0, 1], target=1, template=0, use_ids=True)  # the other items still make prompts


def test_the_configs_buckets_are_the_fine_buckets():
    from configs import base
    from rsllm_jax.data.prompts import FINE_BUCKETS

    assert tuple(base.get_config().prompts.buckets) == FINE_BUCKETS == PromptSettings().buckets
