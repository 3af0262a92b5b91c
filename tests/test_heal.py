"""Recovery fine-tuning (llmrom.heal.train, llmrom.heal.lora, `llmrom heal`) on a tiny compressed llama."""

import copy
import json

import pytest
import torch

import llmrom
from llmrom.eval.cost import count_params
from llmrom import cli
from llmrom.config import CompressConfig
from llmrom.modeling.factorized import FactorizedLinear
from llmrom.heal.train import HealConfig, check_held_out, heal
from llmrom.heal.lora import GGPO, add_adapters, merge_adapters
from llmrom.data.textdata import eval_windows, load_text

from conftest import calib_tokens, tiny_model, trained_tokenizer

FAST = dict(tokens=16 * 4 * 8, seqlen=16, batch_size=4, eval_every=2, patience=100)


@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def compressed(tok):
    model, report = llmrom.compress(tiny_model("llama"), tok, CompressConfig(
        last_blocks=2, module_budget=0.5, nsamples=8, seqlen=16), tokens=calib_tokens(), progress=False)
    return model, report


@pytest.fixture(scope="module")
def texts():
    """Disjoint training and held-out text from the built-in pydoc topics."""
    from pydoc_data.topics import topics
    from llmrom.heal.train import _shingles
    keys = sorted(topics)
    held = "\n\n".join(topics[k] for k in keys[-10:])
    spans = _shingles(held)  # pydoc topics quote each other: keep the ones sharing no span with `held`
    train = [topics[k] for k in keys[:-10] if not _shingles(topics[k]) & spans][:40]
    return "\n\n".join(train), held


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def factor_names(model):
    return {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, FactorizedLinear)
            for k, _ in m.named_parameters()}


def test_heal_trains_when_gradients_are_off_globally(compressed, tok, texts):
    """A caller may have switched autograd off for the whole process; heal must not depend on it."""
    model = copy.deepcopy(compressed[0])
    before = params_of(model)
    torch.set_grad_enabled(False)
    try:
        rec = heal(model, tok, texts[0], HealConfig(mode="factors", lr=1e-3, **FAST), progress=False)
    finally:
        torch.set_grad_enabled(True)
    assert rec["steps"] > 0 and any(not torch.equal(v, before[k]) for k, v in params_of(model).items())


@pytest.mark.parametrize("mode", ["factors", "lora"])
def test_only_the_factors_change_and_the_size_stays(compressed, tok, texts, mode):
    model = copy.deepcopy(compressed[0])
    before = params_of(model)
    # scored on the training text at a small lr, so every evaluation improves and healing keeps its steps:
    # under transformers 5.25 the tiny model at lr 1e-3 never beat its held-out start, healing kept the
    # input weights, and this test saw no factor change
    ev = eval_windows(tok, texts[0], 32, 2)
    rec = heal(model, tok, texts[0], HealConfig(mode=mode, lr=1e-4, **FAST), eval_windows=ev, progress=False)
    after = params_of(model)
    assert after.keys() == before.keys()  # adapters merged away: same tensors, same shapes
    assert all(after[n].shape == before[n].shape for n in before)
    assert rec["parameters"] == count_params(model)
    factors = factor_names(model)
    assert factors and all(torch.equal(after[n], before[n]) for n in before if n not in factors)
    changed = [n for n in factors if not torch.equal(after[n], before[n])]
    assert changed and (mode == "lora" or len(changed) == len(factors))
    e = rec["evaluation"]  # the kept weights are the best evaluated ones, never worse than the input
    assert e["perplexity_after"] == min([e["perplexity_before"]] + [h["perplexity"] for h in e["history"]])
    assert e["perplexity_after"] < e["perplexity_before"]
    assert rec["steps"] == 8 and rec["tokens"] == 512 and rec["peak_rss_bytes"] > 0


def test_merged_lora_computes_what_the_adapters_did(compressed):
    model = copy.deepcopy(compressed[0])
    names = [n for n, m in model.named_modules() if isinstance(m, FactorizedLinear)]
    adapters = add_adapters(model, names, ("first", "second"), rank=4, alpha=8)
    assert len(adapters) == 2 * len(names)
    torch.manual_seed(1)
    with torch.no_grad():
        for ad in adapters.values():
            ad.lora_B.normal_(0, 0.05)
    ids = calib_tokens(4, 16, seed=3)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        ranks = {n: model.get_submodule(n).rank for n in names}
        merge_adapters(model, adapters)
        merged = model(input_ids=ids).logits
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert {n: model.get_submodule(n).rank for n in names} == ranks
    assert (adapted - compressed[0](input_ids=ids).logits).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_ggpo_noise_scales_with_gradient_and_weight_rows(compressed):
    model = copy.deepcopy(compressed[0])
    name = next(n for n, m in model.named_modules() if isinstance(m, FactorizedLinear))
    adapters = add_adapters(model, [name], ("second",), rank=2, alpha=2)
    ad = next(iter(adapters.values()))
    g = GGPO(adapters, alpha=0.0, beta=0.5, seed=0)
    g.perturb()
    rows = ad.noise.pow(2).mean(1).sqrt() / ad.base.weight.pow(2).mean(1).sqrt()  # ~ beta per row
    assert 0.2 < float(rows.median().detach()) < 0.8 and ad.noise.shape == ad.base.weight.shape
    g.grad_rows = {n: torch.zeros(a.base.out_features) for n, a in adapters.items()}
    g.beta, g.alpha = 0.0, 1.0
    g.perturb()
    assert float(ad.noise.abs().max()) == 0.0  # no gradient, no weight term: no perturbation
    # the gradient term is relative: rows with 3x the mean gradient norm get 3x the noise of an average
    # row (in units of their own RMS), and scaling the gradient (the loss) by 1000 changes nothing
    grad = torch.ones(ad.base.out_features)
    grad[: grad.numel() // 2] = 3.0
    for scale in (1.0, 1000.0):
        g.grad_rows = {n: grad * scale for n in adapters}
        g.perturb()
        w = ad.effective_weight().detach()
        rel = (ad.noise.pow(2).mean(1).sqrt() / w.pow(2).mean(1).sqrt()).detach()
        expect = grad / grad.mean()
        assert float((rel / expect).median()) == pytest.approx(1.0, rel=0.35)
        assert float(rel[: grad.numel() // 2].mean() / rel[grad.numel() // 2:].mean()) == pytest.approx(3.0, rel=0.3)
    with pytest.raises(llmrom.LlmromError, match="ggpo"):
        GGPO(adapters, alpha=-1, beta=0, seed=0)


def test_resume_reproduces_the_uninterrupted_run(compressed, tok, texts, tmp_path, mode="lora", ggpo=True):
    """LoRA-GGPO carries the most state: adapters, AdamW moments, schedule, noise generator, gradient rows."""
    ev = eval_windows(tok, texts[1], 32, 2)
    cfg = HealConfig(mode=mode, ggpo=ggpo, lr=1e-3, checkpoint_every=2, **{**FAST, "eval_every": 4})
    whole = copy.deepcopy(compressed[0])
    rec_whole = heal(whole, tok, texts[0], cfg, eval_windows=ev, progress=False, checkpoint_dir=tmp_path / "a")

    def crash(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        heal(copy.deepcopy(compressed[0]), tok, texts[0], cfg, eval_windows=ev, progress=False,
             checkpoint_dir=tmp_path / "b", on_step=crash)
    assert (tmp_path / "b" / "state.pt").exists()
    resumed = copy.deepcopy(compressed[0])
    rec = heal(resumed, tok, texts[0], cfg, eval_windows=ev, progress=False, checkpoint_dir=tmp_path / "b",
               resume=True)
    assert rec["resumed_at_step"] == 4 and rec["steps"] == rec_whole["steps"] == 8
    a, b = params_of(whole), params_of(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert rec["evaluation"]["history"] == rec_whole["evaluation"]["history"]
    other = HealConfig(mode=mode, ggpo=ggpo, lr=2e-3, checkpoint_every=2, **{**FAST, "eval_every": 4})
    with pytest.raises(llmrom.LlmromError, match="other settings"):
        heal(copy.deepcopy(compressed[0]), tok, texts[0], other, progress=False, checkpoint_dir=tmp_path / "b",
             resume=True)


def test_held_out_text_is_never_trained_on(tmp_path, texts):
    train, held = texts
    assert check_held_out("a.txt", train, "b.txt", held) == 0
    with pytest.raises(llmrom.LlmromError, match="both python-docs:tutorial"):
        check_held_out("python-docs:tutorial", held, "python-docs:tutorial", held)
    with pytest.raises(llmrom.LlmromError, match="overlap on disk"):
        check_held_out("python-docs", train, "python-docs:tutorial", held)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "eval.txt").write_text(held)
    with pytest.raises(llmrom.LlmromError, match="overlap on disk"):
        check_held_out(str(tmp_path / "docs"), train, str(tmp_path / "docs" / "eval.txt"), held)
    leaked = train + "\n\n" + held[len(held) // 3: len(held) // 3 + len(held) // 20]  # 5% of the eval text
    with pytest.raises(llmrom.LlmromError, match="verbatim 32-word spans"):
        check_held_out("train.txt", leaked, "eval.txt", held)
    short = train + "\n\n" + " ".join(held.split()[100:131])  # 31 words: shorter than one span
    assert check_held_out("train.txt", short, "eval.txt", held) == 0


def test_bad_configs_are_one_line_errors():
    with pytest.raises(llmrom.LlmromError, match="--train lora"):
        HealConfig(mode="factors", ggpo=True)
    with pytest.raises(llmrom.LlmromError, match="unknown --train"):
        HealConfig(mode="full")
    with pytest.raises(llmrom.LlmromError, match="--tokens"):
        HealConfig(tokens=0)


def test_cli_heals_a_folder_that_both_loaders_read(compressed, tok, texts, tmp_path, capsys):
    import transformers
    folder = llmrom.save(compressed[0], tok, tmp_path / "small", compressed[1])
    (tmp_path / "train.txt").write_text(texts[0])
    (tmp_path / "eval.txt").write_text(texts[1])
    out = tmp_path / "healed"
    common = ["heal", folder, "--data", tmp_path / "train.txt", "--out", out, "--tokens", 256, "--seqlen", 16,
              "--eval-seqlen", 32, "--eval-windows", 2, "--eval-every", 2, "--lr", "1e-2"]
    code = cli.main([str(a) for a in common[:4] + ["--eval", tmp_path / "train.txt"] + common[4:]])
    err = capsys.readouterr().err
    assert code == 2 and "llmrom: error:" in err and "held-out" in err and not out.exists()
    code = cli.main([str(a) for a in common + ["--eval", tmp_path / "eval.txt", "--train", "lora", "--ggpo"]])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "held-out perplexity" in stdout and "(unchanged)" in stdout
    report = json.loads((out / "llmrom_report.json").read_text())
    assert report["totals"] == compressed[1]["totals"] and report["modules"] == compressed[1]["modules"]
    h = report["heal"]
    assert h["mode"] == "lora+ggpo" and h["steps"] == 4 and h["tokens"] == 256
    assert h["data"].endswith("train.txt") and h["evaluation"]["source"].endswith("eval.txt")
    assert h["evaluation"]["perplexity_after"] <= h["evaluation"]["perplexity_before"]
    model, _ = llmrom.load(out)
    n = count_params(compressed[0])
    assert count_params(model) == n == h["parameters"]
    remote = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    ids = calib_tokens(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(remote(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert not list(tmp_path.glob(".healed.*"))  # checkpoints and partial folders are cleaned up
    code = cli.main([str(a) for a in common + ["--eval", "none"]])
    assert code == 2 and "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["factors", "lora"])
def test_joint_groups_heal_and_keep_sharing_one_basis(tok, texts, mode):
    """--factors joint: healing trains each group's shared factors (LoRA on them merges back exactly); the
    groups stay joint and the parameter count stays."""
    from llmrom.modeling.factorized import JointFactorizedLinear, JointPart
    model, _ = llmrom.compress(tiny_model("llama"), tok, CompressConfig(
        last_blocks=2, module_budget=0.5, nsamples=8, seqlen=16, factors="joint"), tokens=calib_tokens(),
        progress=False)
    joint = [n for n, m in model.named_modules() if isinstance(m, JointFactorizedLinear)]
    assert len(joint) == 4
    before, size = params_of(model), count_params(model)
    ev = eval_windows(tok, texts[0], 32, 2)
    rec = heal(model, tok, texts[0], HealConfig(mode=mode, lr=1e-4, **FAST), eval_windows=ev, progress=False)
    after = params_of(model)
    assert rec["parameters"] == count_params(model) == size and after.keys() == before.keys()
    assert any(not torch.equal(after[f"{n}.stacked.first.weight"], before[f"{n}.stacked.first.weight"]) for n in joint)
    parts = [m for m in model.modules() if isinstance(m, JointPart)]
    assert len(parts) == 2 * (2 + 1)  # per block: k and v of q's group, up of gate's
    assert {id(p.joint) for p in parts} == {id(model.get_submodule(n)) for n in joint}  # still the model's groups
