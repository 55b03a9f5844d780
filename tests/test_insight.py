"""Routing insight: the report's numbers under forced routing, upcycling, pruning and merging, the
--init-from warm start, clear errors, and every CLI verb end to end on tiny runs."""

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from moekit import MoEConfig, ModelConfig, MoELayer, MoETransformer
from moekit import checkpoint as ckpt_io
from moekit.cli import main
from moekit.insight.categories import CATEGORIES, classify_bytes, classify_tokens
from moekit.insight.prune import PruneConfig, plan_drop, plan_merge, prune_model, pruned_layer_state
from moekit.insight.report import write_report
from moekit.insight.routing import collect_routing
from moekit.insight.upcycle import UpcycleConfig, upcycle, upcycle_model
from moekit.moe.routers import RouterOutput
from moekit.tokenizer import ByteTokenizer
from moekit.train import TrainConfig, train

TEXT = ("def add(a, b):\n    return a + b  # the sum of 42 and 7\n\nclass Point:\n    x: int = 0\n"
        "    if x == 1:\n        pass\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny MoE run and a tiny dense run (6 steps each) on a small Python corpus."""
    root = tmp_path_factory.mktemp("insight")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOEKIT_CACHE", str(root / "cache"))
        corpus = root / "corpus"
        corpus.mkdir()
        for i in range(12):
            (corpus / f"f{i:02d}.py").write_text((TEXT * 30).replace("Point", f"Point{i}") * (1 + i % 3))
        common = dict(data=str(corpus), steps=6, batch_size=4, seq_len=32, eval_every=3, eval_tokens=512,
                      save_every=6, log_every=1, warmup=2, val_fraction=0.2)
        train(TrainConfig(preset="tiny", out=str(root / "moe"), **common), progress=False)
        train(TrainConfig(preset="tiny-dense", out=str(root / "dense"), **common), progress=False)
        yield {"root": root, "corpus": corpus, "moe": root / "moe", "dense": root / "dense", "common": common}


def _run(capsys, *argv):
    """moekit's CLI in-process: (exit code, parsed stdout JSON or None, stderr)."""
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    out = cap.out.strip().splitlines()
    return code, (json.loads(out[-1]) if code == 0 and out else None), cap.err


def _images_exist(out: Path) -> list[str]:
    html = (out / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert srcs and all((out / s).is_file() and (out / s).stat().st_size > 5000 for s in srcs), srcs
    assert not any(s.startswith(("/", "http")) for s in srcs)  # relative: the page opens from disk
    return srcs


# ---- lexical classes ----------------------------------------------------------------------------
def test_lexical_classes_in_context():
    src = b"    if x1 == 42:\n"
    got = [CATEGORIES[c] for c in classify_bytes(src)]
    expected = ["indentation"] * 4 + ["keyword"] * 2 + ["whitespace"] + ["identifier"] * 2 + ["whitespace"] + \
        ["punctuation"] * 2 + ["whitespace"] + ["digits"] * 2 + ["punctuation", "whitespace"]
    assert got == expected
    assert CATEGORIES[classify_bytes(b"add")[0]] == "identifier" and CATEGORIES[classify_bytes(b"and")[0]] == "keyword"
    # multi-byte tokens take their bytes' majority class; whitespace only when that is all they hold
    pieces = [b"    ", b"if", b" x1", b" ==", b" 42", b":", b"\n", b" 0x1F"]
    got = [CATEGORIES[c] for c in classify_tokens(list(range(len(pieces))), pieces)]
    assert got == ["indentation", "keyword", "identifier", "punctuation", "digits", "punctuation", "whitespace",
                   "digits"]


# ---- the report on forced routing ---------------------------------------------------------------
def _byte_class(b: int) -> str:
    c = chr(b)
    return "space" if c.isspace() else "digit" if c.isdigit() else "word" if (c.isalpha() or c == "_") else "punct"


def _table_by_class() -> torch.Tensor:
    """Layer 0: first choice expert 0 (digits: 4); second by byte class; experts 6 and 7 never."""
    second = {"space": 1, "word": 2, "punct": 3, "digit": 5}
    return torch.tensor([[4 if _byte_class(b) == "digit" else 0, second[_byte_class(b)]] for b in range(256)])


def _forced_model(tables: list[torch.Tensor], **moe_kw):
    """A model whose router i sends token id t to experts tables[i][t] (weights renormalised)."""
    E = 8
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=len(tables), n_heads=2, max_seq_len=64, ffn_hidden=64,
                      moe=MoEConfig(d_model=32, expert_hidden=16, num_experts=E, top_k=2, **moe_kw))
    torch.manual_seed(0)
    model = MoETransformer(cfg).eval()
    current = {}
    model.register_forward_pre_hook(lambda m, args: current.update(ids=args[0]))
    for blk, table in zip(model.layers, tables):
        def forward(x_TD, table=table, **_):  # (the backend's top-k is not needed: the table routes)
            ids_TK = table[current["ids"].reshape(-1)]
            logits_TE = torch.full((x_TD.shape[0], E), -4.0).scatter_(1, ids_TK, 4.0)
            probs_TE = logits_TE.softmax(dim=-1)
            chosen_TK = probs_TE.gather(1, ids_TK)
            return RouterOutput(logits_TE, probs_TE, ids_TK, chosen_TK / chosen_TK.sum(-1, keepdim=True), chosen_TK)
        blk.ffn.router.forward = forward
    return model


def _expected_layer(ids: list[int], table: torch.Tensor, E: int = 8):
    K = table.shape[1]
    per_expert = [Counter() for _ in range(E)]
    coact = [[0] * E for _ in range(E)]
    for t in ids:
        experts = table[t].tolist()
        for e in experts:
            per_expert[e][t] += 1
            for f in experts:
                coact[e][f] += 1
    load = [sum(c.values()) / (len(ids) * K) for c in per_expert]
    return load, coact, per_expert


def test_report_numbers_are_exact_on_forced_routing(tmp_path, capsys):
    tables = [_table_by_class(), torch.stack([torch.arange(256) % 8, (torch.arange(256) + 3) % 8], dim=1)]
    model = _forced_model(tables)
    data = (TEXT * 3).encode()[:256]
    ids_BS = torch.tensor(list(data)).view(8, 32)
    res = write_report(model, ByteTokenizer(), [ids_BS[:5], ids_BS[5:]], tmp_path, categories=True, top_n=5,
                       meta={"model": "forced"})
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s == json.loads(json.dumps(res.summary))
    ids = list(data)
    occurrences = Counter(ids)
    expected_flags = set()
    z = 2 * math.exp(4) + 6 * math.exp(-4)
    p_chosen, p_other = math.exp(4) / z, math.exp(-4) / z
    for layer, table in enumerate(tables):
        ls = s["layers"][str(layer)]
        load, coact, per_expert = _expected_layer(ids, table)
        assert ls["tokens"] == 256 and ls["routed_assignments"] == [sum(c.values()) for c in per_expert]
        assert ls["kept_assignments"] == ls["routed_assignments"] and ls["dropped_assignments"] == 0
        assert ls["load"] == pytest.approx(load, abs=1e-12)
        assert ls["load_ratio"] == pytest.approx([8 * x for x in load], abs=1e-12)
        assert ls["coactivation"]["counts"] == coact
        for e in range(8):
            for f in range(8):
                want = coact[e][f] / coact[e][e] if coact[e][e] else None
                assert ls["coactivation"]["given"][e][f] == (pytest.approx(want) if want is not None else None)
            want_top = sorted(per_expert[e].items(), key=lambda kv: (-kv[1], kv[0]))[:5]
            got_top = ls["top_tokens"][e]
            assert [(t["id"], t["count"]) for t in got_top] == want_top
            n_e = sum(per_expert[e].values())
            for t in got_top:
                assert t["text"] == chr(t["id"])
                assert t["share"] == pytest.approx(t["count"] / n_e)
                assert t["coverage"] == pytest.approx(t["count"] / occurrences[t["id"]])
        entropy = -(2 * p_chosen * math.log(p_chosen) + 6 * p_other * math.log(p_other))
        assert ls["router_entropy"] == pytest.approx(entropy, rel=1e-5)
        for e, share in enumerate(load):  # the rule: < 10% or > 3x the uniform share 1/E
            if share * 8 < 0.1:
                expected_flags.add((layer, e, "starved"))
            elif share * 8 > 3.0:
                expected_flags.add((layer, e, "hot"))
    # layer 0: expert 0 takes every non-digit token (> 3x uniform); 6 and 7 take nothing
    assert {(0, 0, "hot"), (0, 6, "starved"), (0, 7, "starved")} <= expected_flags
    assert {(f["layer"], f["expert"], f["kind"]) for f in s["collapse"]} == expected_flags
    err = capsys.readouterr().err
    assert "ROUTING COLLAPSE" in err
    assert "layer 0 expert 6 is starved" in err and "layer 0 expert 0 is hot" in err
    # classes: the digit expert takes only digits, the whitespace expert only whitespace
    classes = s["layers"]["0"]["classes"]
    assert classes[4]["digits"] == 1.0 and classes[5]["digits"] == 1.0
    assert classes[1]["indentation"] + classes[1]["whitespace"] == pytest.approx(1.0)
    assert classes[2]["identifier"] + classes[2]["keyword"] == pytest.approx(1.0) and classes[2]["keyword"] > 0
    assert sum(s["text_classes"].values()) == pytest.approx(1.0)
    # the page shows the collapse and links only images that exist
    html = (tmp_path / "index.html").read_text()
    assert "Routing collapse" in html
    assert re.search(r"layer 0: <b>hot</b>: 1 expert: .*>0</a> .*<b>starved</b>: 2 experts: .*>6</a>", html)
    srcs = _images_exist(tmp_path)
    assert {"load.png", "entropy.png", "coactivation_L0.png", "classes_L1.png"} <= set(srcs)
    assert "balance_over_training.png" not in srcs  # no metrics.jsonl given


def test_report_counts_capacity_drops(tmp_path):
    table = _table_by_class()
    model = _forced_model([table], capacity_factor=1.0)
    ids_BS = torch.tensor(list((TEXT * 3).encode()[:128])).view(4, 32)
    data = collect_routing(model, [ids_BS[:2], ids_BS[2:]])
    lr = data.layers[0]
    dropped = kept = 0
    for batch in (ids_BS[:2], ids_BS[2:]):
        T = batch.numel()
        cap = math.ceil(T * 2 / 8)
        counts = Counter(e for t in batch.reshape(-1).tolist() for e in table[t].tolist())
        dropped += sum(max(0, c - cap) for c in counts.values())
        kept += sum(min(c, cap) for c in counts.values())
    assert dropped > 0 and lr.dropped_assignments == dropped and int(lr.kept_E.sum()) == kept
    assert int(lr.routed_E.sum()) == 2 * ids_BS.numel()  # load counts routed assignments, before capacity


# ---- upcycling ----------------------------------------------------------------------------------
def _dense_checkpoint(path: Path) -> MoETransformer:
    torch.manual_seed(1)
    dense = MoETransformer(ModelConfig.from_name("tiny-dense", init_std=0.1)).eval()
    ckpt_io.save_checkpoint(path, 3, dense, dense.cfg, ByteTokenizer(), {"seq_len": 32})
    return dense


def test_upcycled_model_starts_as_the_dense_model(tmp_path):
    dense = _dense_checkpoint(tmp_path / "dense")
    res = upcycle(tmp_path / "dense", tmp_path / "up", UpcycleConfig(num_experts=4, top_k=2))
    assert res.exact_at_init and res.max_abs_logit_diff < 1e-5
    model, tok, config = ckpt_io.load_model(tmp_path / "up")
    assert model.cfg.moe.num_experts == 4 and model.cfg.moe.top_k == 2 and model.cfg.moe.expert_hidden == 128
    assert config["train"] == {"seq_len": 32} and tok.kind == "byte"
    ids = torch.randint(0, 256, (3, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = dense(ids).logits, model(ids).logits
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # routing is spread over the experts, so the equality is not one expert doing all the work
        assert all((s.routed_per_expert > 0).all() for s in model(ids).routing.values())
    d_sd, u_sd = dense.state_dict(), model.state_dict()
    for i in range(2):
        for e in range(4):
            assert torch.equal(u_sd[f"layers.{i}.ffn.experts.w_in"][e], d_sd[f"layers.{i}.ffn.in_proj.weight"])
            assert torch.equal(u_sd[f"layers.{i}.ffn.experts.w_out"][e], d_sd[f"layers.{i}.ffn.down_proj.weight"])
        router = u_sd[f"layers.{i}.ffn.router.weight_ED"]
        assert 0.07 < router.std() < 0.13  # a fresh N(0, init_std²) router, init_std = the model's 0.1
    assert all(torch.equal(u_sd[k], v) for k, v in d_sd.items() if ".ffn." not in k)
    # in float64 the equality is exact up to rounding: the renormalised weights sum to 1
    with torch.no_grad():
        up64 = upcycle_model(dense.double(), UpcycleConfig(num_experts=4, top_k=2))
        assert (up64(ids).logits - dense(ids).logits).abs().max() < 1e-12
    # noise makes the experts differ: the output moves, slightly
    noisy = upcycle_model(dense.float(), UpcycleConfig(num_experts=4, top_k=2, noise_std=0.01, seed=3))
    w_in = noisy.layers[0].ffn.experts.w_in
    assert not torch.equal(w_in[0], w_in[1])
    with torch.no_grad():
        diff = (noisy(ids).logits - dense(ids).logits).abs().max()
    assert 1e-5 < diff < 0.05 * dense(ids).logits.abs().max()


def test_upcycle_refuses_bad_requests(tmp_path):
    _dense_checkpoint(tmp_path / "dense")
    with pytest.raises(ValueError, match="top_k=5 is invalid"):
        UpcycleConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="noise_std=-0.1 is invalid"):
        UpcycleConfig(num_experts=4, top_k=2, noise_std=-0.1)
    with pytest.raises(ValueError, match=r"\['expert_hidden'\] follow from the dense FFN"):
        UpcycleConfig(num_experts=4, top_k=2, moe_overrides={"expert_hidden": 7})
    with pytest.raises(ckpt_io.CheckpointError, match="model path not found: .*missing"):
        upcycle(tmp_path / "missing", tmp_path / "x", UpcycleConfig(num_experts=4, top_k=2))
    upcycle(tmp_path / "dense", tmp_path / "up", UpcycleConfig(num_experts=4, top_k=2))
    with pytest.raises(ValueError, match="already an MoE"):
        upcycle(tmp_path / "up", tmp_path / "up2", UpcycleConfig(num_experts=4, top_k=2))
    assert not (tmp_path / "up2").exists()
    before = sorted(p.name for p in (tmp_path / "up").iterdir())
    with pytest.raises(ValueError, match="already exists"):
        upcycle(tmp_path / "dense", tmp_path / "up", UpcycleConfig(num_experts=8, top_k=2))
    assert sorted(p.name for p in (tmp_path / "up").iterdir()) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refuses to delete"):
        upcycle(tmp_path / "dense", tmp_path / "mine", UpcycleConfig(num_experts=4, top_k=2), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_upcycle_then_train_init_from(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))
    code, res, err = _run(capsys, "upcycle", "--from", runs["dense"], "--experts", 4, "--top-k", 2, "--out",
                          tmp_path / "up")
    assert code == 0, err
    assert res["exact_at_init"] and res["num_experts"] == 4 and res["max_abs_logit_diff"] < 1e-5
    common = {**runs["common"], "steps": 1, "lr": 1e-9, "warmup": 0}
    overrides = {"moe": {"expert_hidden": 128, "num_experts": 4}}
    result = train(TrainConfig(preset="tiny", out=str(tmp_path / "cont"), init_from=str(tmp_path / "up"),
                               model_overrides=overrides, **common), progress=False)
    assert result.step == 1
    start, _, _ = ckpt_io.load_model(tmp_path / "up")
    after, _, _ = ckpt_io.load_model(tmp_path / "cont")
    for (k, a), b in zip(start.state_dict().items(), after.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k  # lr 1e-9: one step leaves the loaded weights in place
    state = json.loads((ckpt_io.latest_checkpoint(tmp_path / "cont") / "state.json").read_text())
    assert state["step"] == 1  # a fresh schedule and optimizer, not the source's
    # a model of another shape is refused before anything is written, naming the fields to --set
    with pytest.raises(ValueError, match=r"experts\.w_in has shape \[4, 256, 64\] there, \[8, 128, 64\] here.*"
                                         r"moe\.expert_hidden=128 \(here: 64\), moe\.num_experts=4 \(here: 8\)"):
        train(TrainConfig(preset="tiny", out=str(tmp_path / "bad"), init_from=str(tmp_path / "up"), **common),
              progress=False)
    assert not (tmp_path / "bad").exists()
    code, _, err = _run(capsys, "train", "--preset", "tiny-dense", "--init-from", tmp_path / "up", "--out",
                        tmp_path / "bad", "--data", runs["corpus"], "--no-progress")
    assert code == 2 and "moe=an MoE (here: None)" in err


# ---- pruning and merging ------------------------------------------------------------------------
def test_drop_keeps_the_output_of_tokens_whose_experts_survive(tmp_path):
    torch.manual_seed(0)
    model = MoETransformer(ModelConfig.from_name("tiny", init_std=0.1)).eval()
    for layer in model.moe_layers:
        layer.router.expert_bias[[2, 6]] = -1e4  # experts 2 and 6 are never chosen
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    routing = collect_routing(model, [ids])
    usage = {i: lr.load_E for i, lr in routing.layers.items()}
    assert all(u[2] == 0 and u[6] == 0 for u in usage.values())
    groups = {i: plan_drop(u, 6) for i, u in usage.items()}
    assert all(g == [[0], [1], [3], [4], [5], [7]] for g in groups.values())
    pruned = prune_model(model, groups, usage, model.cfg.moe.replace(num_experts=6))
    assert pruned.cfg.moe.num_experts == 6 and pruned.layers[0].ffn.experts.w_in.shape[0] == 6
    keep = [0, 1, 3, 4, 5, 7]
    assert torch.equal(pruned.layers[1].ffn.router.weight_ED, model.layers[1].ffn.router.weight_ED[keep])
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    ckpt_io.save_checkpoint(tmp_path, 0, pruned, pruned.cfg, ByteTokenizer())
    loaded, _, _ = ckpt_io.load_model(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits, rtol=0, atol=0)


def test_merging_two_identical_experts_preserves_the_output():
    """Expert 1 is expert 0 with its hidden units permuted; the router sends tokens along r to 0 or 1."""
    torch.manual_seed(0)
    D, F = 16, 8
    layer = MoELayer(MoEConfig(d_model=D, expert_hidden=F, num_experts=4, top_k=1)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
        perm = torch.randperm(F)
        w = layer.experts
        w.w_in[1] = torch.cat([w.w_in[0][:F][perm], w.w_in[0][F:][perm]])
        w.w_out[1] = w.w_out[0][:, perm]
        r = torch.randn(D, dtype=torch.float64)
        r = 3 * r / r.norm()
        delta = torch.randn(D, dtype=torch.float64) * 0.3
        layer.router.weight_ED[0], layer.router.weight_ED[1] = r + delta, r - delta
        layer.router.weight_ED[2:] = -r + 0.1 * torch.randn(2, D, dtype=torch.float64)
    x = r / r.norm() * 2 + 0.3 * torch.randn(64, D, dtype=torch.float64)
    x[48:] = -x[48:]  # these tokens go to experts 2 and 3
    with torch.no_grad():
        ids = layer.router(x).expert_ids_TK[:, 0]
        assert set(ids[:48].tolist()) == {0, 1} and set(ids[48:].tolist()) <= {2, 3}
        before = layer(x).output
        usage = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
        merged = MoELayer(layer.cfg.replace(num_experts=3)).double()
        merged.load_state_dict(pruned_layer_state(layer, [[0, 1], [2], [3]], usage, align=True))
        torch.testing.assert_close(merged(x).output, before, rtol=0, atol=1e-12)
        # without aligning the hidden units first, the average is a different function
        unaligned = MoELayer(layer.cfg.replace(num_experts=3)).double()
        unaligned.load_state_dict(pruned_layer_state(layer, [[0, 1], [2], [3]], usage, align=False))
        assert (unaligned(x).output[:48] - before[:48]).abs().max() > 1e-3
        torch.testing.assert_close(unaligned(x).output[48:], before[48:], rtol=0, atol=1e-12)


def test_merge_groups_each_expert_with_its_most_similar_dominant_expert():
    usage = torch.tensor([0.30, 0.05, 0.25, 0.10, 0.20, 0.10])
    sim = torch.eye(6)
    sim[1, 4] = sim[4, 1] = 0.9  # 1 is closest to 4
    sim[3, 0] = sim[0, 3] = 0.8
    sim[5, 2] = sim[2, 5] = 0.7
    assert plan_merge(usage, 3, sim) == [[0, 3], [2, 5], [4, 1]]
    assert plan_drop(usage, 3) == [[0], [2], [4]]
    assert plan_drop(torch.tensor([0.1, 0.2, 0.2, 0.5]), 2) == [[1], [3]]  # ties: the lower index


def test_prune_cli_both_methods_and_errors(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))
    small = ["--calib-tokens", 512, "--eval-tokens", 512]
    for method in ("drop", "merge"):
        code, res, err = _run(capsys, "prune", "--model", runs["moe"], "--experts", 4, "--method", method,
                              "--out", tmp_path / method, *small, "--json")
        assert code == 0, err
        assert res["num_experts_before"] == 8 and res["num_experts_after"] == 4 and res["top_k_after"] == 2
        assert math.isfinite(res["val_loss_before"]) and math.isfinite(res["val_loss_after"])
        groups = res["groups"]["0"]
        assert len(groups) == 4
        if method == "drop":  # the 4 most used experts, each alone
            usage = res["usage"]["0"]
            assert all(len(g) == 1 for g in groups)
            assert min(usage[g[0]] for g in groups) >= max(u for e, u in enumerate(usage) if [e] not in groups)
        else:  # every expert lands in exactly one group
            assert sorted(e for g in groups for e in g) == list(range(8))
        model, _, _ = ckpt_io.load_model(tmp_path / method)
        assert model.cfg.moe.num_experts == 4 and model.layers[0].ffn.experts.w_in.shape[0] == 4
        with torch.no_grad():
            assert torch.isfinite(model(torch.randint(0, 256, (2, 16))).logits).all()
    code, res, err = _run(capsys, "prune", "--model", runs["moe"], "--experts", 1, "--top-k", 1, "--method", "drop",
                          "--out", tmp_path / "one", *small, "--json")
    assert code == 0 and res["top_k_after"] == 1, err
    errors = {
        "dense model (ModelConfig.moe=None): prune needs": ("--model", runs["dense"], "--experts", 2),
        "--experts=8 is invalid: the model has 8 experts": ("--model", runs["moe"], "--experts", 8),
        "--experts=9 is invalid: the model has 8 experts": ("--model", runs["moe"], "--experts", 9),
        "pass --top-k with a value <= 1": ("--model", runs["moe"], "--experts", 1),
        "--top-k=3 is invalid": ("--model", runs["moe"], "--experts", 2, "--top-k", 3),
        "prune output directory": ("--model", runs["moe"], "--experts", 4, "--out", tmp_path / "drop"),
        "model path not found": ("--model", tmp_path / "nowhere", "--experts", 4),
    }
    for message, argv in errors.items():
        out = ("--out", tmp_path / "err") if "--out" not in argv else ()
        code, _, err = _run(capsys, "prune", *argv, "--method", "drop", *out)
        assert code == 2 and message in err and "Traceback" not in err, (message, err)
    assert not (tmp_path / "err").exists() or not any((tmp_path / "err").iterdir())
    with pytest.raises(ValueError, match="--method='prune' is invalid"):
        PruneConfig(num_experts=2, method="prune")


# ---- inspect and plot end to end ----------------------------------------------------------------
def test_inspect_and_plot_cli_end_to_end(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))
    out = tmp_path / "report"
    code, res, err = _run(capsys, "inspect", "--model", runs["moe"], "--out", out, "--max-tokens", 1024)
    assert code == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens"] == res["tokens"] == 1024 and set(s["layers"]) == {"0", "1"}
    for ls in s["layers"].values():
        assert sum(ls["load"]) == pytest.approx(1.0) and sum(ls["routed_assignments"]) == 2 * 1024
        assert len(ls["top_tokens"]) == 8 and ls["classes"] is not None  # a corpus of .py files
    assert s["training"]["steps"] == list(range(1, 7))  # from the run's metrics.jsonl
    assert len(s["collapse"]) == len(res["collapse"])
    if s["collapse"]:
        assert "ROUTING COLLAPSE" in err
    srcs = _images_exist(out)
    assert "balance_over_training.png" in srcs and "coactivation_L1.png" in srcs
    code, _, err = _run(capsys, "inspect", "--model", runs["moe"], "--out", out, "--max-tokens", 1024)
    assert code == 2 and "already exists" in err
    code, _, err = _run(capsys, "inspect", "--model", runs["moe"], "--out", out, "--max-tokens", 256, "--overwrite")
    assert code == 0 and json.loads((out / "summary.json").read_text())["tokens"] == 256
    code, _, err = _run(capsys, "inspect", "--model", runs["dense"], "--out", tmp_path / "d")
    assert code == 2 and "dense model" in err
    # plot: two runs compared
    cmp_out = tmp_path / "compare"
    code, res, err = _run(capsys, "plot", runs["moe"], runs["dense"], "--out", cmp_out)
    assert code == 0, err
    s = json.loads((cmp_out / "summary.json").read_text())
    assert set(s["runs"]) == {"moe", "dense"} and s["runs"]["moe"]["steps"] == 6
    assert s["runs"]["dense"]["final_max_load_ratio"] is None and s["runs"]["moe"]["final_max_load_ratio"] >= 1
    assert s["runs"]["moe"]["final_val_loss"] == pytest.approx(
        [json.loads(x) for x in (runs["moe"] / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"])
    assert set(_images_exist(cmp_out)) == {"loss.png", "balance.png"}
    code, _, err = _run(capsys, "plot", tmp_path / "nope", "--out", tmp_path / "c2")
    assert code == 2 and "run directory not found" in err


def test_inspect_reads_a_hugging_face_directory(runs, tmp_path, capsys, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from moekit.insight.categories import _byte_level_chars, token_bytes
    from moekit.tokenizer import HFTokenizer

    monkeypatch.setenv("MOEKIT_CACHE", str(runs["root"] / "cache"))
    hf = tmp_path / "hf"
    code, _, err = _run(capsys, "convert", "--to-hf", runs["moe"], "--out", hf)
    assert code == 0, err
    assert (hf / "tokenizer.json").is_file()  # the byte tokenizer exports as an equivalent tokenizer.json
    # a byte-level BPE without merges whose ids are the byte values: GPT-2's character map, inverted
    tok = Tokenizer(models.BPE(vocab=_byte_level_chars(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(hf / "tokenizer.json"))
    hf_tok = HFTokenizer.from_file(hf / "tokenizer.json")
    assert hf_tok.encode("def f(x):\n    é") == list("def f(x):\n    é".encode())
    assert token_bytes(hf_tok) == [bytes([i]) for i in range(256)]
    code, res, err = _run(capsys, "inspect", "--model", hf, "--data", runs["corpus"], "--out", tmp_path / "r",
                          "--seq-len", 32, "--max-tokens", 512)
    assert code == 0, err
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["checkpoint"] is None and s["tokens"] == 512 and s["layers"]["0"]["top_tokens"][0]
    assert all(len(t["text"]) == 1 for rows in s["layers"]["1"]["top_tokens"] for t in rows)


def test_plot_names_the_loss_unit_and_flags_runs_that_differ(runs, tmp_path, capsys, monkeypatch):
    """A byte run's loss is nats/byte, a BPE run's nats/token of its tokenizer: never one unlabelled axis."""
    from moekit.tokenizer import train_bpe

    bpe_run = tmp_path / "bpe"
    shutil.copytree(runs["moe"], bpe_run)
    (bpe_run / "tokenizer_config.json").unlink()
    train_bpe([TEXT * 20], 300).save(bpe_run)
    code, _, err = _run(capsys, "plot", runs["moe"], runs["dense"], "--out", tmp_path / "same")
    assert code == 0 and "different units" not in err
    s = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert {r["loss_unit"] for r in s["runs"].values()} == {"nats/byte"} and "loss" not in s["notes"]
    code, _, err = _run(capsys, "plot", runs["moe"], bpe_run, "--out", tmp_path / "mixed")
    assert code == 0 and "different units" in err
    s = json.loads((tmp_path / "mixed" / "summary.json").read_text())
    assert s["runs"]["bpe"]["loss_unit"].startswith("nats/token (tokenizer ")
    assert "not comparable" in s["notes"]["loss"] and "not comparable" in (tmp_path / "mixed" / "index.html").read_text()
