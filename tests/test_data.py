"""The shipped corpus, the tokenizer and the synthetic tasks: labels right, flips exact and recorded."""

import numpy as np
import pytest

from hvpopt.testbed import data


def test_tokenizer_round_trips_the_corpus():
    text = data.corpus_text()
    assert 250_000 < len(text) < 400_000 and text.startswith("First Citizen:")
    tokenizer = data.CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and ids.min() >= 1 and ids.max() == tokenizer.vocab_size - 1
    assert tokenizer.decode(ids) == text
    padded = tokenizer.encode("To be", length=8)
    assert padded[5:].tolist() == [tokenizer.pad_id] * 3 and tokenizer.decode(padded) == "To be"


@pytest.mark.parametrize(
    "text, length, message", [("caf\u00e9", None, "outside the vocabulary"), ("abcdef", 3, "more than the 3 allowed")]
)
def test_tokenizer_refuses_what_it_cannot_encode(text, length, message):
    with pytest.raises(ValueError, match=message):
        data.CharTokenizer("abcdef").encode(text, length)


def test_char_lm_windows_are_next_character_pairs_and_splits_do_not_overlap():
    split = data.char_lm(context_length=16)
    text = data.corpus_text()
    for dataset in (split.train, split.validation):
        offset = int(dataset.ids[3].split("@")[1])
        window = text[offset : offset + 17]
        assert dataset.texts[3] == window
        assert split.tokenizer.decode(dataset.inputs[3]) == window[:-1]
        assert split.tokenizer.decode(dataset.targets[0][3]) == window[1:]
        assert dataset.targets[1].min() == 1
    last_train = max(int(i.split("@")[1]) for i in split.train.ids)
    first_validation = min(int(i.split("@")[1]) for i in split.validation.ids)
    assert last_train + 17 <= first_validation


def test_modular_addition_labels():
    split = data.modular_addition(modulus=7)
    assert split.train.num_examples + split.validation.num_examples == 49
    for text, label in zip(split.train.texts, split.train.targets):
        a, b = text.split("=")[0].split("+")
        assert int(text.split("=")[1]) == label == (int(a) + int(b)) % 7
    assert not set(split.train.ids) & set(split.validation.ids)


def test_bracket_matching_labels_agree_with_a_stack_check():
    split = data.bracket_matching(num_examples=300, max_length=10)
    for tokens, label in zip(split.train.inputs, split.train.targets):
        word = split.tokenizer.decode(tokens)
        depth, ok = [], True
        for c in word:
            if c in "([":
                depth.append(c)
            elif not depth or "([".index(depth.pop()) != ")]".index(c):
                ok = False
        assert label == int(ok and not depth), word
    assert 0.3 < split.train.targets.mean() < 0.7


def test_reverse_targets_are_the_reversed_source_under_the_mask():
    split = data.reverse_strings(num_examples=50, length=4)
    text = split.train.texts[0]
    source, completion = text.split(">")
    assert completion == source[::-1]
    labels, mask = split.train.targets
    predicted = split.tokenizer.decode(labels[0][mask[0] == 1])
    assert predicted == completion and mask.sum(axis=1).tolist() == [4] * split.train.num_examples


@pytest.mark.parametrize(
    "generator, num_classes",
    [
        (lambda **kw: data.modular_addition(modulus=11, **kw), 11),
        (lambda **kw: data.bracket_matching(num_examples=400, **kw), 2),
        (lambda **kw: data.gaussian_blobs(num_examples=300, **kw), 3),
    ],
)
def test_label_flipping_flips_exactly_the_fraction_asked_and_records_it(generator, num_classes):
    clean, noisy = generator(seed=3), generator(seed=3, flip_fraction=0.1)
    assert np.array_equal(clean.train.ids, noisy.train.ids)
    changed = clean.train.targets != noisy.train.targets
    assert changed.sum() == round(0.1 * clean.train.num_examples)
    assert np.array_equal(changed, noisy.train.flipped)
    assert noisy.train.targets.max() < num_classes
    assert not noisy.validation.flipped.any()
    assert np.array_equal(clean.validation.targets, noisy.validation.targets)
    shown = [text for text, flip in zip(noisy.train.texts, noisy.train.flipped) if flip]
    original = [text for text, flip in zip(clean.train.texts, noisy.train.flipped) if flip]
    assert all(a != b for a, b in zip(shown, original))  # the text shows the label trained on


def test_reverse_flipping_corrupts_the_completion():
    split = data.reverse_strings(num_examples=200, flip_fraction=0.25, seed=1)
    assert split.train.flipped.sum() == round(0.25 * split.train.num_examples)
    for text, flipped in zip(split.train.texts, split.train.flipped):
        source, completion = text.split(">")
        assert (completion != source[::-1]) == flipped


def test_generators_are_deterministic_in_the_seed():
    first, again, other = (data.bracket_matching(num_examples=100, seed=s) for s in (0, 0, 1))
    assert np.array_equal(first.train.inputs, again.train.inputs)
    assert list(first.train.texts) == list(again.train.texts)
    assert list(first.train.texts) != list(other.train.texts)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: data.modular_addition(flip_fraction=1.0), "flip_fraction must lie in"),
        (lambda: data.char_lm(flip_fraction=0.1), "not to shakespeare"),
        (lambda: data.gaussian_blobs(num_classes=1), "num_classes must be an integer of at least 2"),
        (lambda: data.reverse_strings(alphabet="a"), "alphabet"),
    ],
)
def test_bad_options_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
