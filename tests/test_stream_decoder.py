"""Streamed text: the pieces add up to the whole decode, multi-byte characters split across byte-level tokens
included, and each push decodes a window, not the whole reply (security review L7)."""
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dflash_edge.runtime.tokenizer import StreamDecoder

TEXT = "héllo wörld — ünïcode ✓ 日本語のテキスト and emoji 🙂🚀 mixed with code: def f(x): return x * 2\n"


class Counting:
    """A tokenizer wrapper that counts the ids it is asked to decode."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.decoded = tok, 0

    def decode(self, ids):
        self.decoded += len(ids)
        return self.tok.decode(ids)


@pytest.fixture(scope="module")
def byte_level():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 50, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def test_pieces_add_up_to_the_whole_text(byte_level):
    ids = byte_level.encode(TEXT * 3).ids
    assert any("\ufffd" in byte_level.decode([i]) for i in ids)  # some tokens are parts of a character
    rng = random.Random(0)
    for _ in range(20):
        stream, pieces, i = StreamDecoder(Counting(byte_level)), [], 0
        while i < len(ids):
            k = rng.randint(1, 3)
            pieces.append(stream.push(ids[i:i + k]))
            i += k
        assert "".join(pieces) == byte_level.decode(ids)
        assert all("\ufffd" not in p for p in pieces)


def test_a_long_reply_costs_linear_decoding(byte_level):
    ids = byte_level.encode(TEXT * 40).ids
    counting = Counting(byte_level)
    stream = StreamDecoder(counting)
    for i in ids:
        stream.push([i])
    # Decoding the whole reply each token would be ~len(ids)^2 / 2 ids; the window keeps it a few per token.
    assert counting.decoded < 8 * len(ids), (counting.decoded, len(ids))
