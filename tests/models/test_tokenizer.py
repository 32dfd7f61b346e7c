"""Tokenizers: byte-level fallback, tokenizer.json through `tokenizers`, streaming decode."""

import json

import pytest

from ssmkit.models.tokenizer import ByteTokenizer, HFTokenizer, StreamDecoder, load_tokenizer


def test_byte_tokenizer_round_trip():
    t = ByteTokenizer()
    ids = t.encode("héllo ✓")
    assert max(ids) < 256 and t.decode(ids) == "héllo ✓"
    assert t.decode(ids + [t.eos_token_id]) == "héllo ✓"
    with pytest.raises(TypeError, match="text must be a str"):
        t.encode(b"x")


def test_stream_decoder_never_splits_a_character():
    s = StreamDecoder(ByteTokenizer())
    pieces = [s.push([b]) for b in "a✓b".encode()]
    assert pieces == ["a", "", "", "✓", "b"]
    assert s.flush() == ""
    s = StreamDecoder(ByteTokenizer(), prefix_ids=list(b"ab"))
    assert s.push(list(b"c")) == "c"


@pytest.mark.peer
def test_tokenizer_json_is_used_when_present(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<unk>": 2, "</s>": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    t = load_tokenizer(tmp_path)
    assert isinstance(t, HFTokenizer) and t.eos_token_id == 3 and t.vocab_size == 4
    assert t.encode("hello world") == [0, 1]
    out = tmp_path / "copy"
    out.mkdir()
    t.save(str(out))
    assert (out / "tokenizer.json").exists() and (out / "tokenizer_config.json").exists()
    # A path that does not exist is an error, not a silent fall-back to bytes; a directory without
    # tokenizer.json means bytes; a tokenizer file of any name is read.
    with pytest.raises(FileNotFoundError, match="nothing-here does not exist"):
        load_tokenizer(tmp_path / "nothing-here")
    assert isinstance(load_tokenizer(tmp_path / "copy" / ".."/ "copy"), HFTokenizer)
    (tmp_path / "empty").mkdir()
    assert isinstance(load_tokenizer(tmp_path / "empty"), ByteTokenizer)
    (tmp_path / "tokenizer.json").rename(tmp_path / "words.json")
    assert load_tokenizer(tmp_path / "words.json").encode("world hello") == [1, 0]
    (tmp_path / "words.json").rename(tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


def test_byte_tokenizer_marks_a_directory(tmp_path):
    ByteTokenizer().save(str(tmp_path))
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["ssmkit_tokenizer"] == "bytes"
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
