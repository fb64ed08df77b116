"""3D CLIP training on tiny phantoms: the contrastive loss falls, resume is exact, the trained text tower
feeds the pipeline, and the CLI reports bad input in one line."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from text2ct_engine.data.ctrate import collate
from text2ct_engine.data.phantom import make_dataset
from text2ct_engine.evaluate.retrieval import retrieval_recall
from text2ct_engine.models import CLIP3D, CLIPTextConfig, CLIPTextModelWithProjection
from text2ct_engine.models.clip3d import LOGIT_SCALE_MAX
from text2ct_engine.pipeline import Text2CTPipeline
from text2ct_engine.text import encode_prompts, load_text_side
from text2ct_engine.tokenizer import CLIPTokenizer
from text2ct_engine.train.__main__ import main as train_main
from text2ct_engine.evaluate.probe import label_accuracy
from text2ct_engine.train.clip import LABEL_READOUT_FILE, CLIPTrainConfig, fresh_clip, read_preprocessing, train_clip
from text2ct_engine.train.common import held_out_split

from tiny_models import CONTEXT_DIM, tiny_pipeline

SIZE = (16, 16, 8)  # x, y, z voxels at 24 x 24 x 48 mm: the phantoms' 384 mm field of view
MODEL = {"text_config": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
         "vision_config": dict(patch_size=[4, 8, 8], hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32),
         "projection_dim": CONTEXT_DIM}
TRAIN = dict(batch_size=4, lr=1e-3, weight_decay=0.0, warmup_steps=2, size=SIZE, eval_size=2, log_every=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 phantoms (8 to train on, 2 held out) and a BPE tokenizer of their reports (512 tokens: no truncation)."""
    root = tmp_path_factory.mktemp("clip")
    make_dataset(str(root / "data"), 10, SIZE, spacing=(24.0, 24.0, 48.0), seed=0, progress=False)
    train, _ = held_out_split(str(root / "data"), SIZE, None, "resize", 2)
    texts = [r.text for r in train.dataset.records]
    tok = CLIPTokenizer.train(texts, vocab_size=400, min_frequency=1, context_length=512)
    tok.save(root / "tokenizer.json")
    return root


def run_api(data, out, steps, **kw):
    train, held = held_out_split(str(data / "data"), SIZE, None, "resize", 2)
    tok = CLIPTokenizer.from_file(data / "tokenizer.json")
    model = fresh_clip(tok, SIZE, MODEL, seed=0)
    cfg = CLIPTrainConfig(**{**TRAIN, "steps": steps, **kw})
    log = train_clip(model, tok, train, cfg, str(out), held, collate_fn=collate, log=lambda _: None)
    return model, tok, log


@pytest.fixture(scope="module")
def trained(data):
    out = data / "run"
    model, tok, log = run_api(data, out, 40, lr_schedule="constant", eval_every=20, save_every=100)
    return out, model, tok, log


def test_training_lowers_the_contrastive_loss(trained):
    out, _, _, log = trained
    losses = [r["loss"] for r in log.rows]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    rows = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41)) and all(r["temperature"] > 0 for r in rows)
    evals = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [20, 40]
    assert all(e["n"] == 2 and 0 <= e["top1"] <= e["top5"] == 1.0 for e in evals)  # 2 candidates: top-5 is sure


def test_the_temperature_cap_does_not_freeze_it(data, tmp_path):
    """The log inverse temperature is capped after each step (as OpenCLIP does), so the forward's cap never
    zeroes its gradient: started past the cap, it comes back to it and keeps moving."""
    train, held = held_out_split(str(data / "data"), SIZE, None, "resize", 2)
    tok = CLIPTokenizer.from_file(data / "tokenizer.json")
    model = fresh_clip(tok, SIZE, MODEL, seed=0)
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE_MAX + 0.5)
    cfg = CLIPTrainConfig(**{**TRAIN, "steps": 4, "lr": 0.05, "save_every": 100, "eval_every": 100})
    train_clip(model, tok, train, cfg, str(tmp_path / "run"), held, collate_fn=collate, log=lambda _: None)
    temperatures = [json.loads(line)["temperature"] for line in (tmp_path / "run" / "loss.jsonl").open()]
    assert 0.0 <= model.logit_scale.item() <= LOGIT_SCALE_MAX
    assert len(set(temperatures)) > 1 and min(temperatures) == pytest.approx(1.0 / 100), temperatures


def test_retrieval_recall_by_hand():
    t = torch.eye(3)
    v = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])  # volumes 1 and 2 swapped
    assert retrieval_recall(t, v, ks=(1, 2, 3)) == {"top1": pytest.approx(1 / 3), "top2": pytest.approx(1 / 3),
                                                    "top3": 1.0}
    assert retrieval_recall(t, torch.ones(3, 3) / 3 ** 0.5)["top1"] == 0.0  # ties count against the text


def test_saved_model_feeds_the_pipeline(trained, tmp_path):
    out, model, _, _ = trained
    assert sorted(p.name for p in (out / "model").iterdir()) == ["clip", "tokenizer.json"]
    cfg = json.loads((out / "checkpoint" / "state.json").read_text())["config"]
    recorded = read_preprocessing(str(out / "model" / "clip"))  # what scoring tools must repeat
    assert recorded == {"size": list(cfg["size"]), "spacing": cfg["spacing"] and list(cfg["spacing"]),
                        "resize": cfg["resize"]}
    back = CLIP3D.from_pretrained(out / "model" / "clip")
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    encoder, tok = load_text_side(out / "model", torch.device("cpu"))
    prompts = ["Findings: Bilateral pleural effusion. Impression: Pleural effusion.", "Findings: Normal."]
    tokens = tok.encode(prompts)
    with torch.no_grad():
        context = encode_prompts(encoder, tok, prompts, torch.device("cpu"))
        assert torch.equal(context, model.encode_context(tokens.input_ids, tokens.attention_mask))
    # combine with a VAE + UNet: copy clip/ and tokenizer.json into their model directory
    tiny_pipeline().save_pretrained(tmp_path / "m")
    shutil.copytree(out / "model" / "clip", tmp_path / "m" / "clip")
    shutil.copy(out / "model" / "tokenizer.json", tmp_path / "m" / "tokenizer.json")
    pipe = Text2CTPipeline.from_pretrained(tmp_path / "m")
    assert torch.equal(pipe.encode_prompts(prompts), context)
    # a text tower of another width does not fit the UNet's cross-attention
    CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, hidden_size=16,
                                               num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                               projection_dim=8, eos_token_id=tok.eos_id)
                                ).save_pretrained(tmp_path / "m" / "clip")
    with pytest.raises(ValueError, match="do not belong together"):
        Text2CTPipeline.from_pretrained(tmp_path / "m")


class Interrupted(Exception):
    pass


def log_rows(run, name):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / name).read_text().splitlines()]


@pytest.mark.parametrize("label_weight", [0.0, 0.5])
def test_resume_after_an_interruption_is_exact(data, tmp_path, label_weight):
    straight, _, _ = run_api(data, tmp_path / "a", 6, save_every=3, eval_every=2,  # cosine schedule over 6 steps
                             label_weight=label_weight)

    def crash(message):
        if message.startswith("step 5/"):  # after the step-3 checkpoint, before the next one
            raise Interrupted

    train, held = held_out_split(str(data / "data"), SIZE, None, "resize", 2)
    tok = CLIPTokenizer.from_file(data / "tokenizer.json")
    cfg = CLIPTrainConfig(**TRAIN, steps=6, save_every=3, eval_every=2, label_weight=label_weight)
    with pytest.raises(Interrupted):
        train_clip(fresh_clip(tok, SIZE, MODEL, seed=0), tok, train, cfg, str(tmp_path / "b"), held,
                   collate_fn=collate, log=crash)
    assert [r["step"] for r in log_rows(tmp_path / "b", "eval.jsonl")] == [2, 4]  # step 4: after the checkpoint
    with pytest.raises(ValueError, match="--resume"):
        train_clip(fresh_clip(tok, SIZE, MODEL), tok, train, cfg, str(tmp_path / "b"), held, collate_fn=collate)
    resumed = CLIP3D.from_pretrained(tmp_path / "b" / "checkpoint")  # the checkpoint is a CLIP3D directory
    train_clip(resumed, tok, train, cfg, str(tmp_path / "b"), held, resume=True, collate_fn=collate,
               log=lambda _: None)
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    readouts = [tmp_path / run / "checkpoint" / LABEL_READOUT_FILE for run in "ab"]
    assert [p.exists() for p in readouts] == [label_weight > 0] * 2
    if label_weight > 0:  # the read-out is resumed too
        a, b = (load_file(p) for p in readouts)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name in ("loss.jsonl", "eval.jsonl"):  # rows past the checkpoint dropped, not repeated
        assert log_rows(tmp_path / "b", name) == log_rows(tmp_path / "a", name)
    with pytest.raises(ValueError, match="cannot take this run from 6 to 8 steps: its cosine learning rate"):
        train_clip(resumed, tok, train, CLIPTrainConfig(**TRAIN, steps=8, save_every=3, eval_every=2,
                                                        label_weight=label_weight),
                   str(tmp_path / "b"), held, resume=True, collate_fn=collate)  # cosine: steps set the schedule
    with pytest.raises(ValueError, match="label_weight"):  # the read-out cannot be switched on or off midway
        train_clip(resumed, tok, train, CLIPTrainConfig(**TRAIN, steps=6, save_every=3, eval_every=2,
                                                        label_weight=0.25 if label_weight else 1.0),
                   str(tmp_path / "b"), held, resume=True, collate_fn=collate)


def test_label_accuracy_by_hand():
    labels = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1, 0, 1], [1, 0, 0]])  # label 1 never present: left out
    logits = torch.tensor([[2.0, -1, -1], [1, 5, -1], [3, -1, -2], [-1, 1, -1]])  # 2 of 4 right, 3 of 4 right
    acc, majority = label_accuracy(logits, labels)
    assert acc == pytest.approx((2 / 4 + 3 / 4) / 2) and majority == pytest.approx((3 / 4 + 3 / 4) / 2)


def test_label_weight_trains_a_shared_readout_of_the_findings(data, tmp_path):
    _, _, log = run_api(data, tmp_path / "run", 30, lr=1e-2, lr_schedule="constant", eval_every=30, save_every=100,
                        label_weight=1.0)
    rows = log.rows
    assert all(r["loss"] == pytest.approx(r["contrastive_loss"] + r["labels_loss"], rel=1e-5) for r in rows)
    first, last = (sum(r["labels_loss"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < 0.6 * first, (first, last)  # from ~ln 2 per label
    (evals,) = log_rows(tmp_path / "run", "eval.jsonl")
    assert {"label_acc_text", "label_acc_volume", "label_acc_majority"} <= evals.keys()
    assert all(0.0 <= evals[k] <= 1.0 for k in ("label_acc_text", "label_acc_volume", "label_acc_majority"))
    assert sorted(p.name for p in (tmp_path / "run" / "model").iterdir()) == ["clip", "tokenizer.json"]


def test_cli_trains_extends_and_resumes(data, tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({**TRAIN, "lr_schedule": "constant", "save_every": 3,
                                                 "eval_every": 3, "model": MODEL}))
    base = ["clip", "--data", str(data / "data"), "--tokenizer", str(data / "tokenizer.json"),
            "--config", str(tmp_path / "c.json")]
    assert train_main([*base, "--out", str(tmp_path / "a"), "--steps", "6"]) == 0
    assert train_main([*base, "--out", str(tmp_path / "b"), "--steps", "3"]) == 0
    assert "recall top-1" in capsys.readouterr().out
    assert train_main([*base, "--out", str(tmp_path / "b"), "--steps", "6"]) == 2
    assert "--resume" in capsys.readouterr().err
    # the run's settings, model and tokenizer: no --config or --tokenizer needed again
    assert train_main(["clip", "--data", str(data / "data"), "--out", str(tmp_path / "b"), "--steps", "6",
                       "--resume"]) == 0
    assert "lr_schedule constant" in capsys.readouterr().out
    a, b = (load_file(tmp_path / run / "checkpoint" / "model.safetensors") for run in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in (tmp_path / "b" / "loss.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5, 6]
    # a cosine run cannot be extended (its learning rate falls to 0 at --steps): one line says what to do
    cosine = ["clip", "--data", str(data / "data"), "--out", str(tmp_path / "cos")]
    assert train_main([*cosine[:3], "--tokenizer", str(data / "tokenizer.json"), "--config", str(tmp_path / "c.json"),
                       "--lr-schedule", "cosine", *cosine[3:], "--steps", "3"]) == 0
    capsys.readouterr()
    assert train_main([*cosine, "--resume", "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cosine learning rate falls to 0 at step 3" in err[0] and "--init" in err[0], err
    assert train_main(["clip", "--data", str(data / "data"), "--out", str(tmp_path / "b"), "--resume",
                       "--lr-schedule", "cosine", "--steps", "7"]) == 2  # a constant run: the schedule may not switch
    assert "lr_schedule constant -> cosine" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["no_data", "no_tokenizer", "bad_config", "bad_size", "bad_type", "bad_triple",
                                  "zero_interval", "negative_label_weight", "no_labels"])
def test_cli_bad_input_is_one_line(case, data, tmp_path, capsys):
    wrong = {"bad_config": {"bogus": 1}, "bad_type": {"steps": "abc"}, "bad_triple": {"spacing": [1, 2]}}
    config = {"model": MODEL, "eval_size": 2, **wrong.get(case, {})}
    (tmp_path / "c.json").write_text(json.dumps(config))
    args = ["clip", "--data", str(data / "data"), "--out", str(tmp_path / "run"), "--tokenizer",
            str(data / "tokenizer.json"), "--config", str(tmp_path / "c.json"), "--size", *map(str, SIZE)]
    expected = {"no_data": "data directory", "no_tokenizer": "no such tokenizer file", "bad_config": "bogus",
                "bad_size": "multiple of the volume tower's patch",
                "bad_type": "steps must be a whole number, got 'abc'",
                "bad_triple": "spacing must be a list of 3 numbers",
                "zero_interval": "eval_every (--eval-every) must be at least 1",
                "negative_label_weight": "label_weight must be a finite number >= 0, got -1.0",
                "no_labels": "--label-weight needs finding labels for every training pair, but 8 of 8"}[case]
    if case == "no_data":
        args[2] = str(tmp_path / "missing")
    elif case == "no_tokenizer":
        args[6] = str(tmp_path / "missing.json")
    elif case == "bad_size":
        args[-3:] = ["16", "12", "8"]
    elif case == "zero_interval":
        args += ["--eval-every", "0"]
    elif case == "negative_label_weight":
        args += ["--label-weight", "-1"]
    elif case == "no_labels":
        shutil.copytree(data / "data", tmp_path / "data")
        shutil.rmtree(tmp_path / "data" / "dataset" / "multi_abnormality_labels")
        args[2] = str(tmp_path / "data")
        args += ["--label-weight", "1"]
    assert train_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()


def test_held_out_pairs_come_from_the_valid_split_when_there_is_one(tmp_path):
    make_dataset(str(tmp_path), 3, SIZE, spacing=(24.0, 24.0, 48.0), seed=5, progress=False)
    with pytest.raises(ValueError, match="no valid split to hold 3 out of"):
        held_out_split(str(tmp_path), SIZE, None, "resize", 3)
    train, held = held_out_split(str(tmp_path), SIZE, None, "resize", 1)
    assert (len(train), len(held)) == (2, 1)  # the last training pair is held out
    make_dataset(str(tmp_path), 2, SIZE, spacing=(24.0, 24.0, 48.0), seed=6, split="valid", force=True,
                 progress=False)
    train, held = held_out_split(str(tmp_path), SIZE, None, "resize", 5)
    assert len(train) == 3 and [held[i]["name"] for i in range(len(held))] == ["valid_1_a_1.nii.gz",
                                                                                "valid_2_a_1.nii.gz"]
    assert held_out_split(str(tmp_path), SIZE, None, "resize", 0)[1] is None
