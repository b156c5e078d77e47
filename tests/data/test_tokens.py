import pytest
import torch

from nanosae.data.tokens import in_background, token_batches, windows
from nanosae.models.tokenizers import Tokenizer


class CharTokenizer(Tokenizer):
    """a -> 1, b -> 2, ...; BOS is 0."""

    bos_id, eos_id, vocab_size = 0, None, 27

    def encode(self, text):
        return [ord(c) - 96 for c in text]

    def decode(self, ids):
        return "".join(chr(i + 96) for i in ids)


def test_packing_puts_bos_at_window_start_and_between_documents():
    got = list(windows(["abc", "de", "fghij"], CharTokenizer(), context_size=4))
    # stream: a b c BOS d e BOS f g h i j ; each window = BOS + 3 stream tokens; the tail (j) is dropped
    assert got == [([0, 1, 2, 3], 4), ([0, 0, 4, 5], 4), ([0, 0, 6, 7], 4), ([0, 8, 9, 10], 4)]


def test_no_pack_truncates_and_pads():
    got = list(windows(["abcdef", "de"], CharTokenizer(), context_size=4, pack=False))
    assert got == [([0, 1, 2, 3], 4), ([0, 4, 5, 0], 3)]


def test_valid_mask_excludes_bos_padding_and_first_positions():
    [batch] = list(token_batches(["abc", "de", "fghij"], CharTokenizer(), context_size=4, batch_size=8))
    assert batch.tokens.shape == (4, 4)
    assert batch.valid.tolist() == [
        [False, True, True, True],
        [False, False, True, True],
        [False, False, True, True],
        [False, True, True, True],
    ]
    [batch] = list(token_batches(["abcdef", "de"], CharTokenizer(), 4, 8, pack=False, exclude_first=2))
    assert batch.valid.tolist() == [[False, False, True, True], [False, False, True, False]]


def test_batches_keep_order_and_last_partial():
    batches = list(token_batches(["abcdefghijklmnop"], CharTokenizer(), context_size=3, batch_size=3))
    assert [b.tokens.shape[0] for b in batches] == [3, 3, 2]
    assert torch.cat([b.tokens for b in batches])[:, 1:].flatten().tolist() == list(range(1, 17))


def test_background_worker_passes_items_and_errors():
    assert list(in_background(iter(range(100)), depth=2)) == list(range(100))

    def broken():
        yield 1
        raise ValueError("bad doc")

    it = in_background(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad doc"):
        next(it)


def test_closing_the_consumer_joins_the_worker():
    """A prefetch thread left running at exit can abort the process (exit 134): closing must join it."""
    import threading
    import time

    def slow():
        for i in range(1000):
            time.sleep(0.001)
            yield i

    before = set(threading.enumerate())  # another test's worker, not yet collected, is not this one's
    items = in_background(slow())
    assert [next(items) for _ in range(3)] == [0, 1, 2]
    assert [t for t in set(threading.enumerate()) - before if t.name == "nanosae-prefetch"]
    items.close()
    assert not [t for t in set(threading.enumerate()) - before if t.name == "nanosae-prefetch"]
