"""What a person sees at the command line: help with defaults and examples, readable generation,
closing summaries, progress bars on a terminal only."""

import argparse
import dataclasses
import io
import json
import re
import sys

import pytest

from moekit import checkpoint as ckpt_io
from moekit.cli import build_parser, demo_summary, main, whitespace_note
from moekit.model import MoETransformer
from moekit.presets import miniature
from moekit.tokenizer import ByteTokenizer

HIDDEN = {("bench layer", "--memory-probe"), ("bench layer", "--one-shape")}  # a fresh process's internal options


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the command line by its command: the top level, each verb, nested ones too."""
    from moekit import bench

    found = {"moekit": build_parser(), "bench layer": bench.build_parser()}
    todo = ["moekit"]
    while todo:
        name = todo.pop()
        for action in found[name]._actions:
            if isinstance(action, argparse._SubParsersAction):
                for verb, p in action.choices.items():
                    found[verb] = p
                    todo.append(verb)
    return found


PARSERS = _parsers()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    return parser._get_formatter()._expand_help(action)


def test_every_option_of_every_verb_has_help_and_a_default():
    missing, no_default = [], []
    for name, parser in PARSERS.items():
        one_of = {a for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            flag = action.option_strings[0] if action.option_strings else action.dest
            if (name, flag) in HIDDEN:
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {flag}")
            # an option taking a value that may be left out says what it is then
            elif action.option_strings and action.nargs != 0 and not action.required and action not in one_of \
                    and "default" not in _help(parser, action):
                no_default.append(f"{name} {flag}")
    assert len(PARSERS) > 12  # the walk reaches every verb
    assert not missing, f"options without help: {missing}"
    assert not no_default, f"options whose help shows no default: {no_default}"


def test_every_verb_has_examples():
    for name, parser in PARSERS.items():
        if name == "moekit":
            continue
        examples = [line for line in (parser.epilog or "").splitlines() if line.startswith("  moekit ")]
        assert parser.epilog.startswith("examples:") and examples, name
        assert "examples:\n  moekit" in parser.format_help(), name  # the epilog keeps its lines


def test_train_help_groups_its_flags_and_shows_the_config_defaults():
    from moekit.train import TrainConfig

    train = PARSERS["train"]
    groups = {g.title: [a.option_strings[0] for a in g._group_actions] for g in train._action_groups}
    assert {"model", "data", "optimisation", "checkpoints", "output"} <= set(groups)
    assert groups["options"] == ["-h"]  # every flag sits in a named group
    assert "--lr" in groups["optimisation"] and "--save-every" in groups["checkpoints"]
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    shown = 0
    for action in train._actions:
        m = re.search(r"\(default: ([^)]*)\)", _help(train, action))
        if m and action.dest in defaults and defaults[action.dest] is not None:
            assert m.group(1) == str(defaults[action.dest]), action.dest
            shown += 1
    assert shown >= 15
    assert "(default: 600)" in train.format_help() and "(default: 0.003)" in train.format_help()


def test_moekit_alone_prints_help_instead_of_starting_the_demo(capsys, monkeypatch):
    import moekit.train.demo

    def no_demo(*a, **kw):
        raise AssertionError("moekit without a verb started the demo")

    monkeypatch.setattr(moekit.train.demo, "run_demo", no_demo)
    assert main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: moekit") and "moekit demo --quick" in out and "generate" in out


def test_bench_without_a_suite_lists_the_benchmarks(capsys):
    assert main(["bench"]) == 0
    cap = capsys.readouterr()
    assert "layer" in cap.out and "benchmarks/NAME.py" in cap.out and "suite" in cap.out and not cap.err


# ---- generate -----------------------------------------------------------------------------------
@pytest.fixture
def tiny_run(tmp_path):
    model = MoETransformer(miniature("tiny"))
    ckpt_io.save_checkpoint(tmp_path / "run", 1, model, model.cfg, ByteTokenizer())
    return tmp_path / "run"


def _fake_generate(monkeypatch, text: str, seen: dict, read_stdout=None):
    """moekit.generate.generate replaced by one producing ``text`` (bytes as tokens); records its keywords
    and, given ``read_stdout``, what stdout shows after each token."""
    gen_module = sys.modules["moekit.generate"]
    ids = list(text.encode())

    def fake(model, prompts, max_new_tokens, on_token=None, **kw):
        seen.update(kw)
        seen["shown"] = []
        for t in ids[:max_new_tokens]:
            on_token([t])
            if read_stdout is not None:
                seen["shown"].append(read_stdout())
        return gen_module.GenerateResult([ids[:max_new_tokens]], [False])

    monkeypatch.setattr(gen_module, "generate", fake)


def test_generate_echoes_the_prompt_streams_and_reports_on_stderr(tiny_run, capsys, monkeypatch):
    seen: dict = {}
    _fake_generate(monkeypatch, "ab c", seen, read_stdout=lambda: capsys.readouterr().out)
    assert main(["generate", "--model", str(tiny_run), "--prompt", "def f():", "--max-new-tokens", "4"]) == 0
    assert seen["shown"] == ["def f():a", "b", " ", "c"]  # each token's text on stdout as it is produced
    cap = capsys.readouterr()
    assert cap.out == "\n"
    # sampling by default, with a drawn seed that is reported
    assert seen["temperature"] == 0.8 and seen["top_k"] == 50 and seen["top_p"] is None
    seed = seen["seed"]
    assert isinstance(seed, int) and f"seed {seed} (--seed {seed} repeats it)" in cap.err
    assert re.search(r"moekit: 4 tokens in [\d.]+ s \([\d.]+ tokens/s", cap.err)
    assert "temperature 0.8, top-k 50, top-p off" in cap.err and "--max-new-tokens 4 reached" in cap.err
    assert "whitespace" not in cap.err


def test_generate_makes_whitespace_only_output_visible(tiny_run, capsys, monkeypatch):
    _fake_generate(monkeypatch, "\n" + " " * 79, {})
    assert main(["generate", "--model", str(tiny_run), "--prompt", "def fib(n):", "--max-new-tokens", "80",
                 "--temperature", "0"]) == 0
    cap = capsys.readouterr()
    assert cap.out == "def fib(n):\n" + " " * 79 + "\n"
    assert "the continuation is whitespace only: 80 characters (1 newline, 79 spaces): '\\n   " in cap.err
    assert "greedy (--temperature 0)" in cap.err
    assert whitespace_note("x ") is None and "no text" in whitespace_note("")
    assert "(2 tabs)" in whitespace_note("\t\t")


def test_generate_dims_the_prompt_on_a_terminal_unless_no_color(tiny_run, capsys, monkeypatch):
    _fake_generate(monkeypatch, "z", {})
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.delenv("NO_COLOR", raising=False)
    argv = ["generate", "--model", str(tiny_run), "--prompt", "hi", "--max-new-tokens", "1"]
    assert main(argv) == 0
    assert capsys.readouterr().out == "\033[2mhi\033[0mz\n"
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(argv) == 0
    assert capsys.readouterr().out == "hiz\n"


def test_generate_for_real_repeats_itself_with_the_reported_seed(tiny_run, capsys):
    argv = ["generate", "--model", str(tiny_run), "--prompt", "def ", "--max-new-tokens", "12"]
    assert main([*argv, "--json"]) == 0
    cap = capsys.readouterr()
    first = json.loads(cap.out)
    seed = first["sampling"]["seed"]
    assert first["sampling"]["temperature"] == 0.8 and f"--seed {seed}" in cap.err and len(first["ids"]) == 12
    assert main([*argv, "--json", "--seed", str(seed)]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == first["ids"]
    assert main([*argv, "--seed", str(seed)]) == 0
    assert capsys.readouterr().out == "def " + first["text"] + "\n"


# ---- summaries ----------------------------------------------------------------------------------
def test_train_ends_with_a_summary_and_writes_the_json(tmp_path, corpus_dir, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(corpus_dir), "--out", str(out), "--steps", "2",
            "--batch-size", "2", "--seq-len", "32", "--eval-every", "2", "--eval-tokens", "128", "--no-progress"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    saved = json.loads((out / "summary.json").read_text())
    assert saved["step"] == 2 and saved["tokens"] == 2 * 2 * 32 and saved["interrupted"] is False
    assert text.startswith(f"moekit train: {out}, preset tiny: ") and "active" in text
    assert "2 steps, 128 tokens in" in text and f"validation loss {saved['val_loss']:.4f} at step 2" in text
    assert f"checkpoint {out / 'ckpt-00000002'}" in text and str(out / "summary.json") in text
    assert f"moekit inspect --model {out}" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    assert main([*argv[:-1], "--resume", "--steps", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads((out / "summary.json").read_text())


def _demo_summary(hit: bool, collapse: bool = False, busy: float = 0.01) -> dict:
    run = dict(final_val_loss=2.0, steps=120, flops=1.5e13, seconds=95.0, total_params=3_200_000,
               active_params=3_200_000)
    moe = {**run, "final_val_loss": 1.8, "seconds": 130.0, "total_params": 9_100_000}
    summary = {"dense": run, "moe": moe, "moe_reached_dense_final_loss": hit, "quick": True, "seed": 1,
               "out": "runs/d", "plot": "runs/d/loss.png", "json": "runs/d/summary.json",
               "lr": {"dense": 0.003, "moe": 0.0015},
               "moe_routing": {"settle_step": 20, "median_max_load_after_settle": {"0": 1.31, "1": 1.52},
                               "collapse_after_settle": [{"step": 40, "layers": [1]}] if collapse else [],
                               "max_load_by_step": {"0": [[10, 2.0]], "1": [[10, 2.5]]}},
               "timing": {"measured": "training steps only", "one_off_seconds_before_clocks": 12.3,
                          "cpu": "Some CPU", "threads": 2, "other_processes_cpu_share": {"dense": 0.0, "moe": busy},
                          "busy": busy > 0.05}}
    if hit:
        summary["moe_at_dense_final_loss"] = {"steps": 78.4, "flops": 1e13, "seconds": 80.0, "steps_ratio": 0.653,
                                              "flops_ratio": 0.653, "seconds_ratio": 0.615}
    return summary


def test_demo_summary_says_what_was_found_and_where(capsys, monkeypatch):
    text = demo_summary(_demo_summary(True))
    assert "seed 1" in text and "--quick: short runs, noisier figures" in text
    lines = text.splitlines()
    dense = next(line for line in lines if line.strip().startswith("dense"))
    assert dense.split() == ["dense", "3.20M", "3.20M", "0.003", "2.0000", "120", "1m35s", "0.792"]
    assert next(line for line in lines if line.strip().startswith("moe ")).split()[:4] == ["moe", "9.10M", "3.20M",
                                                                                          "0.0015"]
    assert "final validation loss (2.0000) at step 78, after 1m20s" in text
    assert "0.65x the steps, 0.65x the FLOPs and 0.61x the wall-clock of the dense model" in text
    flat = " ".join(text.split())  # (the routing and timing lines wrap at 100 columns)
    assert "1.31, 1.52; no collapse flag after step 20" in flat
    assert "one-off costs (12 s" in flat and "up to 1% of the CPU" in flat and "WARNING" not in flat
    assert max(len(line) for line in lines if not line.startswith("  figures")) <= 100
    assert "runs/d/summary.json" in text and "runs/d/loss.png" in text and "moekit inspect --model runs/d/moe" in text
    assert "did not reach the dense model's final validation loss (2.0000) in 120 steps" in \
        demo_summary(_demo_summary(False))
    flagged = " ".join(demo_summary(_demo_summary(True, collapse=True, busy=0.3)).split())
    assert "collapse flags after step 20 at 1 logged steps (first: step 40, layers [1])" in flagged
    assert "up to 30% of the CPU" in flagged and "WARNING: the machine was busy" in flagged
    import moekit.train.demo

    monkeypatch.setattr(moekit.train.demo, "run_demo", lambda *a, **kw: _demo_summary(True))
    assert main(["demo", "--quick"]) == 0
    assert capsys.readouterr().out.startswith("moekit demo: an MoE against a dense model")
    assert main(["demo", "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == _demo_summary(True)
    monkeypatch.setattr(moekit.train.demo, "run_demo", lambda *a, **kw: {"interrupted": 130, "out": "runs/d",
                                                                          "run": "moe"})
    assert main(["demo", "--out", "runs/d", "--seed", "2"]) == 130
    assert "continue with: moekit demo --out runs/d --seed 2 --resume" in capsys.readouterr().err


def test_prune_summary(tmp_path):
    from moekit.insight.cli import prune_summary
    from moekit.insight.prune import PruneResult

    res = PruneResult(tmp_path / "p" / "ckpt-00000000", "drop", 8, 4, 2, 2, 1.5, 1.625, 4096,
                      {0: [[1], [3], [5], [7]]}, {0: [0.05, 0.2, 0.05, 0.2, 0.05, 0.2, 0.05, 0.2]})
    text = prune_summary(res, "runs/moe")
    assert text.startswith("moekit prune: runs/moe, 8 -> 4 experts per MoE layer by drop (top-k 2 -> 2)")
    assert "validation loss 1.5000 -> 1.6250 (+0.1250) on 4,096 tokens" in text
    assert "layer 0: experts 1, 3, 5, 7 (80% of the calibration load on the kept experts)" in text
    assert str(tmp_path / "p" / "moekit-insight.json") in text


# ---- progress -----------------------------------------------------------------------------------
class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_only_on_a_terminal_and_without_no_progress(monkeypatch):
    from moekit.argtypes import progress_enabled

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not progress_enabled(False)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert progress_enabled(False) and not progress_enabled(True)


@pytest.fixture
def text_file(tmp_path):
    from conftest import TEXT

    path = tmp_path / "text.py"
    path.write_text(TEXT * 4)
    return path


@pytest.mark.parametrize("flags,shown", [((), True), (("--no-progress",), False)])
def test_eval_shows_progress_on_a_terminal(tiny_run, text_file, monkeypatch, capsys, flags, shown):
    argv = ["eval", "--model", str(tiny_run), "--data", str(text_file), "--seq-len", "16", "--batch-size", "2",
            "--max-tokens", "256", *flags]
    assert main(argv) == 0  # stderr is not a terminal under capsys: no bar
    cap = capsys.readouterr()
    assert json.loads(cap.out)["tokens"] > 0 and "validation" not in cap.err
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(argv) == 0
    assert ("validation" in terminal.getvalue() and "tok" in terminal.getvalue()) == shown
    model = ckpt_io.load_model(tiny_run)[0]
    assert not model._forward_pre_hooks


def test_token_progress_counts_the_tokens_and_removes_its_hook(monkeypatch):
    import torch

    from moekit.insight.routing import token_progress

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    model = MoETransformer(miniature("tiny")).eval()
    with torch.no_grad(), token_progress(model, "routing", 64) as bar:
        for _ in range(2):
            model(torch.zeros(2, 16, dtype=torch.long))
    assert bar.n == 64 and not model._forward_pre_hooks
    assert "routing:" in terminal.getvalue()
    with token_progress(model, "routing", 64, enabled=False) as bar:
        assert bar is None and not model._forward_pre_hooks


def test_inspect_prune_and_convert_show_progress_on_a_terminal(tiny_run, text_file, tmp_path, monkeypatch, capsys):
    from moekit.interop import to_hf

    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    common = ["--data", str(text_file), "--seq-len", "16", "--batch-size", "2"]
    assert main(["inspect", "--model", str(tiny_run), "--out", str(tmp_path / "i"), "--max-tokens", "128",
                 *common]) == 0
    assert "routing" in terminal.getvalue()
    capsys.readouterr()
    assert main(["prune", "--model", str(tiny_run), "--experts", "4", "--method", "drop", "--out", str(tmp_path / "p"),
                 "--calib-tokens", "128", "--eval-tokens", "128", "--calib-split", "val", *common]) == 0
    for phase in ("calibration", "validation before", "validation after"):
        assert phase in terminal.getvalue()
    assert capsys.readouterr().out.startswith(f"moekit prune: {tiny_run}, 8 -> 4 experts")
    model, tok, _ = ckpt_io.load_model(tiny_run)
    to_hf(model, tmp_path / "hf", tokenizer=tok)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "reading layers" in terminal.getvalue()
    before = len(terminal.getvalue())
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back2"), "--no-progress"]) == 0
    assert len(terminal.getvalue()) == before
