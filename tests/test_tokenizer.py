"""Tokenizer: training, fixed-length encoding, truncation warning, empty prompts, CLIP tokenizer.json, CLI."""
import csv
import json
import re
import subprocess
import sys
import warnings

import pytest
import torch

from text2ct_engine.tokenizer import (CLIPTokenizer, PromptTruncatedWarning, main, read_corpus, report_text)

REPORTS = [
    "Findings: The lungs are clear. No pleural effusion. Impression: No acute findings.",
    "Findings: A small nodule in the right upper lobe. Impression: Lung nodule, follow-up advised.",
    "Findings: Cardiomegaly and pericardial effusion. Impression: Cardiomegaly.",
    "Findings: Emphysema in both upper lobes, bronchiectasis. Impression: Emphysema.",
    "Findings: Consolidation in the left lower lobe with atelectasis. Impression: Pneumonia likely.",
] * 4


@pytest.fixture(scope="module")
def trained():
    return CLIPTokenizer.train(REPORTS, vocab_size=320, min_frequency=2, context_length=32)


def test_train_and_encode(trained):
    tok = trained
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 1)
    assert 258 < tok.vocab_size <= 320
    enc = tok.encode(["the lungs are clear", "Cardiomegaly."])
    assert enc.input_ids.shape == (2, 32) and enc.input_ids.dtype == torch.long
    for row, mask in zip(enc.input_ids, enc.attention_mask):
        n = int(mask.sum())
        assert row[0] == tok.bos_id and row[n - 1] == tok.eos_id
        assert (row[n:] == tok.pad_id).all() and mask[:n].all()
        assert not (row[1:n - 1] == tok.eos_id).any()
    assert not enc.empty.any()
    # learned merges: a frequent word is fewer tokens than letters
    assert len(tok.tokenize("cardiomegaly")) < len("cardiomegaly")


def test_round_trip(trained, tmp_path):
    text = "Findings:  The LUNGS are clear,\n small nodule (3 mm) — ünusual"
    enc = trained.encode(text, context_length=64)
    assert trained.decode(enc.input_ids[0]) == " ".join(text.lower().split())
    trained.save(tmp_path / "tokenizer.json")
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    back = CLIPTokenizer.from_file(tmp_path / "tokenizer.json")
    assert back.context_length == 32  # stored in the file
    assert torch.equal(back.encode(text, context_length=64).input_ids, enc.input_ids)
    assert back.encode("lungs").input_ids.shape == (1, 32)
    # other tools read the same file: padding/truncation are recorded there
    stored = json.loads((tmp_path / "tokenizer.json").read_text())
    assert stored["truncation"]["max_length"] == 32 and stored["padding"]["pad_token"] == "<|endoftext|>"


def test_truncation_warns_and_keeps_end_token(trained):
    long = " ".join(REPORTS[:4])
    with pytest.warns(PromptTruncatedWarning, match=r'prompt 1 \(".{40}\.\.\."\) has .* more than the context length 32'):
        enc = trained.encode(["short", long])
    with pytest.warns(PromptTruncatedWarning, match=re.escape(f'the prompt "{long[:40]}..." has')):
        trained.encode([long])
    assert enc.attention_mask[1].all()
    assert enc.input_ids[1, -1] == trained.eos_id and enc.input_ids[1, 0] == trained.bos_id
    assert enc.input_ids[1, 1:31].tolist() == trained.tokenize(long)[:30]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.encode("the lungs are clear")  # no warning when it fits


def test_empty_prompt(trained):
    for bad in ("", "   \n\t"):
        with pytest.raises(ValueError, match="empty; pass allow_empty=True"):
            trained.encode(bad)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        trained.encode(["lungs", ""])
    enc = trained.encode(["lungs", ""], allow_empty=True)
    assert enc.empty.tolist() == [False, True]
    assert enc.input_ids[1, :2].tolist() == [trained.bos_id, trained.eos_id]
    with pytest.raises(TypeError):
        trained.encode([None])


def test_loads_hf_clip_tokenizer_json(tmp_path):
    """A tokenizer.json written by transformers' CLIPTokenizer (CLIP BPE with '</w>' word ends)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": len(alphabet) + i for i, c in enumerate(alphabet)})
    merges = ["l u", "lu n", "lun g", "t h", "th e</w>", "lung s</w>", "c l", "e a", "cl ea", "clea r</w>"]
    for m in merges:
        vocab[m.replace(" ", "")] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    hf = transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    hf.backend_tokenizer.save(str(tmp_path / "tokenizer.json"))

    tok = CLIPTokenizer.from_file(tmp_path / "tokenizer.json", context_length=16)
    assert tok.eos_id == len(vocab) - 1 and tok.pad_id == tok.eos_id  # HF's CLIP pads with <|endoftext|>
    prompts = ["The lungs  are CLEAR!", "the"]
    ref = hf(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    enc = tok.encode(prompts)
    assert torch.equal(enc.input_ids, ref["input_ids"])
    assert torch.equal(enc.attention_mask, ref["attention_mask"])
    assert tok.decode(enc.input_ids[0]) == "the lungs are clear !"


def test_read_corpus_csv_and_text(tmp_path):
    rows = [{"VolumeName": "a.nii.gz", "Findings_EN": "Lungs clear.", "Impressions_EN": "Normal."},
            {"VolumeName": "b.nii.gz", "Findings_EN": "Nodule.", "Impressions_EN": ""},
            {"VolumeName": "c.nii.gz", "Findings_EN": "", "Impressions_EN": ""}]
    with open(tmp_path / "reports.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (tmp_path / "more.txt").write_text("one report\n\nanother report\n")
    texts = read_corpus([tmp_path / "reports.csv", tmp_path / "more.txt"])
    assert texts == ["Findings: Lungs clear. Impression: Normal.", "Findings: Nodule.", "one report",
                     "another report"]
    assert report_text("x", "nan") == "Findings: x"
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no report columns"):
        read_corpus([tmp_path / "bad.csv"])


def test_cli_train(tmp_path, capsys):
    corpus = tmp_path / "reports.txt"
    corpus.write_text("\n".join(REPORTS) + "\n")
    out = tmp_path / "tok" / "tokenizer.json"
    out.parent.mkdir()
    args = ["train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out), "--context-length", "24"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    tok = CLIPTokenizer.from_file(out)
    assert tok.context_length == 24 and tok.vocab_size <= 300
    # errors: one line on stderr, nothing written
    cases = [
        (args, 2, "exists; pass --force"),
        (["train", "--corpus", str(tmp_path / "nope.csv"), "--vocab-size", "300", "--out", str(tmp_path / "x.json")],
         1, "corpus file not found"),
        (["train", "--corpus", str(corpus), "--vocab-size", "100", "--out", str(tmp_path / "x.json")],
         2, "--vocab-size must be at least 258"),
        (["train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(tmp_path / "no" / "x.json")],
         2, "cannot write"),
        (["encode", "--tokenizer", str(out), "--prompt", " "], 1, "--prompt is empty: give the text to encode"),
    ]
    for argv, code, msg in cases:
        assert main(argv) == code
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.json").exists()
    assert main(args + ["--force"]) == 0
    with pytest.raises(SystemExit) as e:
        main(["train", "--corpus", str(corpus), "--vocab-size", "many", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1


def test_cli_module_entry(tmp_path, capsys):
    corpus = tmp_path / "reports.txt"
    corpus.write_text("\n".join(REPORTS) + "\n")
    out = tmp_path / "tokenizer.json"
    run = subprocess.run([sys.executable, "-m", "text2ct_engine.tokenizer", "train", "--corpus", str(corpus),
                          "--vocab-size", "300", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert main(["encode", "--tokenizer", str(out), "--prompt", "lungs"]) == 0
    ids = capsys.readouterr().out.split()
    assert ids[0] == "0" and ids[-1] == "1" and len(ids) >= 3


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        CLIPTokenizer.from_file(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        CLIPTokenizer.from_file(tmp_path / "broken.json")


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.csv"])
def test_cli_names_a_corpus_file_that_is_not_utf8(tmp_path, capsys, name):
    bad = tmp_path / name
    bad.write_bytes("text\nPleurale Ergüsse beidseits.\n".encode("latin-1"))
    assert main(["train", "--corpus", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "t.json")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: corpus file {bad} is not UTF-8 text (byte 0xfc")
    assert err[0].endswith("save it as UTF-8") and not (tmp_path / "t.json").exists()
