"""Training data: what is held out for validation, UTF-8 under text tokenizers, lazy splits, and
run configs that name their data by absolute path."""

import json

import numpy as np
import pytest

from conftest import TEXT, tiny_cfg
from moekit.tokenizer import ByteTokenizer, train_bpe
from moekit.train import TrainConfig, train
from moekit.train import data as data_mod
from moekit.train.data import (Corpus, Document, discover, iter_texts, load_tokens, open_corpus, read_text, split,
                               tokenizer_texts)

LINES = "".join(f"line {i:04d}: some text that is unique to this line\n" for i in range(400))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))


def _cached(tmp_path):
    return sorted((tmp_path / "cache" / "tokens").glob("*.npy"))


def _bpe():
    return train_bpe(iter([TEXT, LINES]), vocab_size=300)


# ---- one document: validation is its tail, never its training text -----------------------------
def test_one_file_is_split_inside_with_the_tail_held_out(tmp_path, capsys):
    path = tmp_path / "input.txt"
    path.write_text(LINES)
    corpus = open_corpus(path, 0.02)
    note = capsys.readouterr().err
    (train_doc,), (val_doc,) = corpus.train_docs, corpus.val_docs
    cut = val_doc.span[0]
    assert train_doc.span == (0, cut) and val_doc.span == (cut, len(LINES))
    assert LINES[cut - 1] == "\n"  # a line start was near the 2% mark
    assert abs((len(LINES) - cut) / len(LINES) - 0.02) <= 0.02 / 4 + 1e-9
    line = LINES.count("\n", 0, cut) + 1
    expected = (f"--data {path} is one document: validating on its last 2% ({len(LINES) - cut:,} bytes "
                f"from line {line:,})")
    assert corpus.description == expected and note == f"moekit: {expected}\n"

    tokens = load_tokens(corpus, ByteTokenizer())
    train_text, val_text = bytes(tokens.train).decode(), bytes(tokens.val).decode()
    assert train_text + val_text == LINES
    assert all(val_line not in train_text for val_line in val_text.splitlines())
    # two cache entries, one per half, and the same cut every time
    assert len(_cached(tmp_path)) == 2
    again = open_corpus(path, 0.02)
    assert (again.train_docs, again.val_docs) == (corpus.train_docs, corpus.val_docs)
    assert split(discover(path)[0], 0.02) == ([train_doc], [val_doc])


def test_every_one_document_source_is_split_inside(tmp_path):
    """A directory holding one file, and a JSONL file with one non-blank line, are one document too."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "only.md").write_text(LINES)
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps({"text": LINES}) + "\n\n  \n")  # blank lines are no documents
    for source, name in ((tmp_path / "dir", "only.md"), (jsonl, "one.jsonl:1")):
        corpus = open_corpus(source, 0.1)
        assert corpus.description.startswith(f"--data {source} holds one document ({name}): validating on its "
                                             f"last 10% (")
        tokens = load_tokens(corpus, ByteTokenizer())
        train_text, val_text = bytes(tokens.train).decode(), bytes(tokens.val).decode()
        assert train_text + val_text == LINES and val_text.startswith("line 0360")


def test_a_cut_with_no_line_start_near_falls_on_a_character_boundary(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("é✓" * 500)  # one line of 2- and 3-byte characters
    corpus = open_corpus(path, 0.0504)  # the 5.04% mark, byte 2374, is inside a "✓"
    assert corpus.val_docs[0].span == (2375, 2500)
    assert corpus.description.endswith("its last 5.04% (125 bytes from byte 2,375 of line 1)")
    halves = read_text(corpus.train_docs[0]), read_text(corpus.val_docs[0])  # both decode
    assert "".join(halves) == "é✓" * 500 and halves[1]


def test_a_document_too_small_to_split_is_refused_by_name(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("x")
    with pytest.raises(ValueError, match=f"{tiny} is one document of 1 byte.*too small"):
        open_corpus(tiny)
    short = tmp_path / "short.txt"
    short.write_text(LINES[:3000])
    open_corpus(short, 0.02, seq_len=32)  # a 60-byte tail holds one 33-token window
    with pytest.raises(ValueError, match=f"--data {short}: the validation text has .* seq_len=256"):
        open_corpus(short, 0.02, seq_len=256)


# ---- UTF-8 --------------------------------------------------------------------------------------
def test_default_corpus_leaves_out_files_that_are_not_utf8(tmp_path, monkeypatch):
    root = tmp_path / "stdlib"
    (root / "test" / "encoded_modules").mkdir(parents=True)
    for i in range(6):
        (root / f"mod{i}.py").write_text(TEXT.replace("Point", f"Point{i}"))
    latin = root / "test" / "encoded_modules" / "module_iso_8859_1.py"
    latin.write_bytes("# -*- coding: iso-8859-1 -*-\ns = 'café'\n".encode("latin-1"))
    monkeypatch.setattr(data_mod, "default_corpus_root", lambda: root)
    corpus = open_corpus(None, 0.2)
    names = {d.name for d in corpus.train_docs + corpus.val_docs}
    assert names == {f"mod{i}.py" for i in range(6)}
    assert corpus.description.endswith("1 file(s) that are not UTF-8 left out")
    # a BPE tokenizer trains and tokenises; the byte tokenizer sees the very same documents
    tok = train_bpe(iter_texts(corpus.train_docs), vocab_size=300)
    tokens = load_tokens(corpus, tok)
    assert len(tokens.train) and len(tokens.val)
    byte = load_tokens(corpus, ByteTokenizer())
    assert b"caf" not in bytes(byte.train) + bytes(byte.val)


def _mixed(tmp_path):
    """A directory of good files and one latin-1 file whose first bad byte is at offset 7."""
    d = tmp_path / "mixed"
    d.mkdir()
    for i in range(8):
        (d / f"f{i}.txt").write_text(LINES)
    bad = d / "latin.txt"
    bad.write_bytes(b"abc\n" + "café\n".encode("latin-1") * 50)
    return d, bad


def _both_sides(d, bad):
    """Two splits of ``d``: the bad file in training, then in validation."""
    docs, source = discover(d)
    good = [doc for doc in docs if doc.path != bad]
    worse = [doc for doc in docs if doc.path == bad]
    return [Corpus(good[1:] + worse, good[:1], source, 0.1), Corpus(good[1:], good[:1] + worse, source, 0.1)]


def test_a_file_that_is_not_utf8_fails_before_anything_is_tokenised(tmp_path, monkeypatch):
    d, bad = _mixed(tmp_path)
    calls = []
    real = data_mod._tokenize
    monkeypatch.setattr(data_mod, "_tokenize", lambda docs, tok: calls.append(len(docs)) or real(docs, tok))
    for corpus in _both_sides(d, bad):
        with pytest.raises(ValueError, match=rf"{bad} \(byte offset 7\) is not valid UTF-8"):
            load_tokens(corpus, _bpe())
        assert calls == []
    assert len(load_tokens(open_corpus(d, 0.1), ByteTokenizer()).train) > 0  # any bytes for the byte tokenizer


def test_tokenizer_training_checks_its_texts_before_it_starts(tmp_path):
    d, bad = _mixed(tmp_path)
    docs, _ = discover(d)
    with pytest.raises(ValueError, match=rf"{bad} \(byte offset 7\)"):
        iter_texts(docs)  # raised at the call: nothing is read lazily by the trainer first
    for c in _both_sides(d, bad):  # the whole corpus is checked, the validation split included
        with pytest.raises(ValueError, match=str(bad)):
            tokenizer_texts(c)


def test_a_split_one_document_is_checked_at_file_offsets(tmp_path):
    path = tmp_path / "input.txt"
    path.write_bytes(LINES.encode() + "café\n".encode("latin-1"))
    corpus = open_corpus(path, 0.02)
    with pytest.raises(ValueError, match=rf"{path} \(byte offset {len(LINES) + 3}\) is not valid UTF-8"):
        read_text(corpus.val_docs[0])


def test_jsonl_that_is_not_utf8_is_named_by_line_and_offset(tmp_path):
    path = tmp_path / "d.jsonl"
    good = (json.dumps({"text": LINES}) + "\n").encode()
    path.write_bytes(good + b'{"text": "caf\xe9"}\n' + good)
    with pytest.raises(ValueError, match=rf"{path} line 2 is not valid UTF-8 \(byte offset {len(good) + 13} "):
        load_tokens(open_corpus(path, 0.5), ByteTokenizer())
    path.write_text(json.dumps({"text": "lone \ud800 surrogate"}) + "\n" + json.dumps({"text": LINES}) + "\n")
    with pytest.raises(ValueError, match=rf"{path} line 1: .*lone surrogate"):
        load_tokens(open_corpus(path, 0.5), ByteTokenizer())


# ---- lazy splits --------------------------------------------------------------------------------
def test_evaluation_tokenises_only_the_validation_split(tmp_path):
    d, bad = _mixed(tmp_path)
    corpus = _both_sides(d, bad)[0]
    tokens = load_tokens(corpus, _bpe(), splits=("val",))
    assert len(tokens.val) > 0 and len(_cached(tmp_path)) == 1
    with pytest.raises(ValueError, match=str(bad)):  # the training split loads on first use
        tokens.train
    with pytest.raises(ValueError, match="split='test' is invalid"):
        load_tokens(corpus, ByteTokenizer(), splits=("test",))


# ---- absolute paths in the run's config --------------------------------------------------------
def test_train_config_stores_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(preset="tiny", data="corpus/../input.txt", tokenizer="tok.json", init_from="~/up")
    assert cfg.data == str(tmp_path / "input.txt") and cfg.tokenizer == str(tmp_path / "tok.json")
    assert cfg.init_from.startswith("/") and "~" not in cfg.init_from
    assert TrainConfig(preset="tiny", tokenizer="bpe").tokenizer == "bpe"
    assert TrainConfig(**cfg.to_dict()) == cfg
    assert TrainConfig.absolute_paths({"data": "x", "tokenizer": "byte", "steps": 3}) == \
        {"data": str(tmp_path / "x"), "tokenizer": "byte", "steps": 3}
    with pytest.raises(ValueError, match="--data='' is invalid"):
        TrainConfig(preset="tiny", data="")


def test_a_run_on_a_relative_data_path_evaluates_and_resumes_from_elsewhere(tmp_path, monkeypatch, capsys):
    from moekit.cli import main

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "input.txt").write_text(LINES * 3)  # one file: the held-out tail validates
    monkeypatch.chdir(work)
    cfg = tiny_cfg("run", "input.txt", steps=4, save_every=2, eval_every=2, val_fraction=0.1)
    res = train(cfg, progress=False)
    assert res.val_loss is not None
    saved = json.loads((work / "run" / "train_config.json").read_text())
    assert saved["data"] == str(work / "input.txt")

    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["eval", "--model", str(work / "run")]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["tokens"] > 0
    assert f"--data {work / 'input.txt'} is one document: validating on its last 10%" in out.err
    assert main(["train", "--out", str(work / "run"), "--resume", "--steps", "6", "--no-progress", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 6


def test_documents_with_a_span_are_distinct_cache_entries(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(LINES)
    whole = Document("a.txt", path)
    head = Document("a.txt", path, span=(0, 100))
    keys = {data_mod._cache_key([d], "s", ByteTokenizer(), "train:0.02") for d in (whole, head)}
    assert len(keys) == 2
    assert np.array_equal(data_mod._tokenize([head], ByteTokenizer()), np.frombuffer(LINES[:100].encode(), np.uint8))
