"""The token embedding (and its tied head) factorized by LLM-ROM, and planned with the blocks."""

import pytest
import torch
import transformers

import llmrom
from llmrom.plan.choose import linear_shapes
from llmrom.modeling.arch import layout_for
from llmrom.plan.autoplan import choose_last_n, trial_loss
from llmrom.config import CompressConfig
from llmrom.eval.cost import count_params, linear_macs_per_token
from llmrom.plan.embedding import HEAD_SHARE, embedding_basis, embedding_shape, factorize_embedding, head_input_moment
from llmrom.errors import LlmromError
from llmrom.modeling.factorized import FactorizedEmbedding, FactorizedHead, FactorizedLinear
from llmrom.eval.perplexity import mean_nll
from llmrom.loop.pipeline import compress_blocks
from llmrom.plan.ranks import feasible_last_n, last_blocks_plan

from conftest import TinyTokenizer, calib_tokens, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_full_rank_factors_reproduce_the_model(family):
    """Rank = width: E P P^T = E, so logits are unchanged (Gemma's embedding scale, GPT-2's position
    embeddings and tied heads included); the tie survives as one shared table."""
    model = tiny_model(family)
    ids = calib_tokens(2, 12, seed=3)
    ref = logits(model, ids)
    shape = embedding_shape(model)
    tied = shape.head is not None
    factorize_embedding(model, shape, calib_tokens(), shape.dim)
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    assert isinstance(model.get_output_embeddings(), FactorizedHead) == tied
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    torch.testing.assert_close(logits(model, ids), ref, atol=1e-4, rtol=1e-4)


def test_the_basis_is_the_calibration_weighted_optimum():
    """The rank-r projection's error on the calibration tokens' rows is the sum of the dropped
    eigenvalues, and lower than plain SVD's top-r right singular vectors of the whole table."""
    torch.manual_seed(0)
    weight = torch.randn(300, 32, dtype=torch.float64) @ torch.diag(torch.linspace(1, 3, 32, dtype=torch.float64))
    tokens = torch.randint(0, 40, (8, 64))  # only 40 of 300 tokens occur
    vals, vecs = embedding_basis(weight, tokens)
    rows = weight[tokens.flatten()]
    r = 12
    err = ((rows - rows @ vecs[:, :r] @ vecs[:, :r].T) ** 2).sum(1).mean()
    torch.testing.assert_close(err, vals[r:].sum())
    svd = torch.linalg.svd(weight, full_matrices=False)[2][:r].T
    assert err < ((rows - rows @ svd @ svd.T) ** 2).sum(1).mean()


@pytest.mark.parametrize("share", [0.5, 0.75])
def test_a_tied_heads_basis_weighs_the_used_rows_and_the_hidden_states(share):
    """With the head's input moment, the rank-r error, each side divided by its total energy and
    weighed by its share, is the sum of the dropped eigenvalues: lower than with the lookup's basis,
    which is better on the rows alone."""
    torch.manual_seed(0)
    weight = torch.randn(300, 32, dtype=torch.float64) @ torch.diag(torch.linspace(1, 3, 32, dtype=torch.float64))
    tokens = torch.randint(0, 40, (8, 64))
    hidden = torch.randn(500, 32, dtype=torch.float64) @ torch.diag(torch.linspace(3, 1, 32, dtype=torch.float64))
    vals, vecs = embedding_basis(weight, tokens, hidden.T @ hidden / len(hidden), share)
    rows, r = weight[tokens.flatten()], 12

    def err(x, v):
        return ((x - x @ v @ v.T) ** 2).sum(1).mean()

    def mixed(v):
        return ((1 - share) * err(rows, v) / (rows ** 2).sum(1).mean()
                + share * err(hidden, v) / (hidden ** 2).sum(1).mean())

    lookup = embedding_basis(weight, tokens)[1][:, :r]
    torch.testing.assert_close(mixed(vecs[:, :r]), vals[r:].sum())
    assert mixed(vecs[:, :r]) < mixed(lookup)
    assert err(rows, lookup) < err(rows, vecs[:, :r])
    with pytest.raises(LlmromError, match="head_share"):
        embedding_basis(weight, tokens, hidden.T @ hidden, 1.5)


@pytest.mark.parametrize("family_name", ["llama", "gemma3", "qwen2"])
def test_head_input_moment_is_the_second_moment_of_the_heads_inputs(family_name):
    """Stopping each forward at the head records exactly what a full forward feeds it, in uneven
    batches; an untied head (Qwen2 here) has no share in the table's basis."""
    model = tiny_model(family_name)
    shape, ids = embedding_shape(model), calib_tokens(6, 16)
    if shape.head is None:
        assert head_input_moment(model, shape, ids) is None
        return
    seen = []
    handle = model.get_submodule(shape.head).register_forward_hook(
        lambda m, args, out: seen.append(args[0].reshape(-1, shape.dim).double()))
    logits(model, ids)
    handle.remove()
    h = torch.cat(seen)
    torch.testing.assert_close(head_input_moment(model, shape, ids, batch_size=4), h.T @ h / len(h))


def test_a_token_id_outside_the_vocabulary_is_named_before_any_forward():
    model = tiny_model("llama")
    shape, ids = embedding_shape(model), calib_tokens(4, 16)
    ids[0, 3] = shape.vocab + 5
    for call in (lambda: head_input_moment(model, shape, ids), lambda: factorize_embedding(model, shape, ids, 8)):
        with pytest.raises(LlmromError, match=f"token id {shape.vocab + 5} is outside the embedding's vocabulary"):
            call()
    assert not isinstance(model.get_input_embeddings(), FactorizedEmbedding)


@pytest.mark.parametrize("family_name", ["llama", "qwen2", "gemma3"])
def test_explicit_embedding_budget_meets_the_budget_and_round_trips(family_name, tmp_path):
    model = tiny_model(family_name)
    total = count_params(model)
    shape = embedding_shape(model)
    cfg = CompressConfig(budget=0.8, embedding_budget=0.6, nsamples=12, seqlen=16, batch_size=4)
    model, report = llmrom.compress(model, TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    emb = report["plan"]["embedding"]
    assert emb["rank"] == shape.rank_for(0.6) < shape.dim and emb["head"] == shape.head
    assert emb["head_share"] == (HEAD_SHARE if shape.head else None)
    assert emb["parameters_after"] == shape.factor_params(emb["rank"]) <= 0.6 * shape.dense_params
    assert report["totals"]["parameters_after"] == count_params(model) <= 0.8 * total
    ids = calib_tokens(2, 12, seed=5)
    ref = logits(model, ids)
    out = llmrom.save(model, TinyTokenizer(), tmp_path / "m", report)
    loaded, _ = llmrom.load(out)
    assert isinstance(loaded.get_input_embeddings(), FactorizedEmbedding)
    if shape.head:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight
    assert count_params(loaded) == count_params(model)
    assert torch.equal(logits(loaded, ids), ref)


def test_dense_export_merges_the_embedding(tmp_path):
    model = tiny_model("llama")
    cfg = CompressConfig(budget=0.9, embedding_budget=0.5, centered=False, nsamples=12, seqlen=16, batch_size=4)
    model, report = llmrom.compress(model, TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    ids = calib_tokens(2, 12, seed=5)
    ref = logits(model, ids)
    out = llmrom.save(model, TinyTokenizer(), tmp_path / "d", report, export_dense=True)
    plain = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    assert plain.lm_head.weight is plain.get_input_embeddings().weight  # still tied, like the original
    torch.testing.assert_close(logits(plain, ids), ref, atol=1e-4, rtol=1e-4)


def test_factorized_head_counts_its_macs():
    model = tiny_model("llama")
    before = linear_macs_per_token(model)
    shape = embedding_shape(model)
    rank = 16
    factorize_embedding(model, shape, calib_tokens(), rank)
    # the head's V x d becomes d x r + r x V; the embedding adds its r -> d linear
    assert linear_macs_per_token(model) == before - shape.vocab * shape.dim + 2 * rank * shape.dim + rank * shape.vocab


def test_automatic_plan_scores_embedding_shares_and_restores_the_weights():
    model = tiny_model("llama")
    layout = layout_for(model)
    shapes = linear_shapes(model, layout, False)
    total, budget, n_blocks = count_params(model), 0.85, 2
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    opts = CompressConfig(budget=budget, batch_size=4).loop_options(progress=False)
    (rank, last_n, b), info = choose_last_n(model, layout, shapes, n_blocks, feasible_last_n(budget, total, shapes, 2),
                                            calib_tokens(16, 16), opts, n_profile=8, n_eval=8,
                                            embedding=embedding_shape(model), total=total, budget=budget)
    ranks = {c["embedding_rank"] for c in info["candidates"]}
    assert None in ranks and len(ranks) > 1  # the dense embedding and some factorized shares were scored
    finalists = [c for c in info["candidates"] if "trial_calib_loss" in c]
    kinds = {(c["embedding_rank"] is not None, c["last_blocks"] > 0) for c in info["candidates"]}
    assert len(finalists) == len(kinds) > 1  # one trial compression per kind of candidate
    for c in finalists:  # each is its kind's best by the proxy
        assert c["proxy_calib_loss"] == min(o["proxy_calib_loss"] for o in info["candidates"]
                                            if (o["embedding_rank"] is not None, o["last_blocks"] > 0) ==
                                            (c["embedding_rank"] is not None, c["last_blocks"] > 0))
    best = min(finalists, key=lambda c: c["trial_calib_loss"])
    assert (rank, last_n, b) == (best["embedding_rank"], best["last_blocks"], best["module_budget"])
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert not any(isinstance(m, FactorizedLinear) for m in model.modules())  # the trials' blocks were put back


def test_without_trials_the_proxy_alone_decides():
    model = tiny_model("llama")
    layout = layout_for(model)
    shapes = linear_shapes(model, layout, False)
    total, budget = count_params(model), 0.85
    opts = CompressConfig(budget=budget, batch_size=4).loop_options(progress=False)
    choice, info = choose_last_n(model, layout, shapes, 2, feasible_last_n(budget, total, shapes, 2),
                                 calib_tokens(16, 16), opts, n_profile=8, n_eval=8, embedding=embedding_shape(model),
                                 total=total, budget=budget, trial_windows=0)
    best = min(info["candidates"], key=lambda c: c["proxy_calib_loss"])
    assert choice == (best["embedding_rank"], best["last_blocks"], best["module_budget"])
    assert not any("trial_calib_loss" in c for c in info["candidates"])


def test_trial_loss_is_the_loss_of_that_plan_compressed():
    """A finalist's trial score is exactly the held-out loss of the model compressed with its plan
    (embedding projected, then the sequential loop on the trial windows), and it leaves the model dense."""
    model = tiny_model("llama")
    layout, emb = layout_for(model), embedding_shape(model)
    shapes = linear_shapes(model, layout, True, interp=True)
    opts = CompressConfig(budget=0.8, batch_size=4).loop_options(progress=False)
    calib, held = calib_tokens(8, 16), calib_tokens(4, 16, seed=5)
    row = {"embedding_rank": 24, "last_blocks": 1, "module_budget": 0.5}
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    w = model.get_submodule(emb.name).weight
    basis = embedding_basis(w.data, calib, head_input_moment(model, emb, calib))[1]
    score = trial_loss(model, layout, shapes, 2, row, emb, basis, calib, held, opts)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())

    vecs = basis[:, :24].to(w.dtype)
    w.data = (w.data @ vecs) @ vecs.T
    records = compress_blocks(model, layout, calib, last_blocks_plan(shapes, 2, 1, 0.5), opts)
    assert records and all(r.name.startswith(f"{layout.blocks_path}.1.") for r in records)
    assert score == pytest.approx(mean_nll(model, held), rel=1e-6)
    assert score != pytest.approx(mean_nll(tiny_model("llama"), held), rel=1e-4)  # not the dense model's loss


def test_default_compress_meets_the_budget_whatever_it_chooses():
    model = tiny_model("gemma3")
    total = count_params(model)
    cfg = CompressConfig(budget=0.8, nsamples=16, seqlen=16, batch_size=4)
    model, report = llmrom.compress(model, TinyTokenizer(), cfg, tokens=calib_tokens(16, 16), progress=False)
    assert "embedding_rank" in report["plan"]["auto"]["candidates"][0]
    assert count_params(model) == report["totals"]["parameters_after"] <= 0.8 * total
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding) == ("embedding" in report["plan"])


def test_bad_embedding_input_is_refused_by_name(tmp_path, tiny_folder):
    with pytest.raises(LlmromError, match="--embedding-budget must be in"):
        CompressConfig(budget=0.8, embedding_budget=1.5)
    model = tiny_model("llama")
    cfg = CompressConfig(budget=0.9, embedding_budget=0.7, nsamples=12, seqlen=16, batch_size=4)
    model, _ = llmrom.compress(model, TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    with pytest.raises(LlmromError, match="already compressed"):
        llmrom.compress(model, TinyTokenizer(), cfg, tokens=calib_tokens(), progress=False)
    from llmrom.loop.stream import compress_streaming
    with pytest.raises(LlmromError, match="--stream keeps the token embedding dense"):
        compress_streaming(str(tiny_folder), tmp_path / "out", CompressConfig(last_blocks=1, module_budget=0.5,
                                                                           embedding_budget=0.5))


def test_cli_plan_line_names_the_embedding():
    from llmrom.cli import _plan_line
    emb = {"name": "model.embed_tokens", "rank": 433, "head": "lm_head", "kept": 0.6766}
    alone = {"policy": "last-blocks (automatic)", "last_blocks": 0, "module_budget": None, "embedding": emb}
    assert _plan_line(alone) == ("last-blocks (automatic): every block dense; token embedding and tied head at "
                                 "rank 433 (keeps 0.68)")
    both = {**alone, "last_blocks": 3, "module_budget": 0.5}
    assert _plan_line(both).startswith("last-blocks (automatic): last 3 blocks at module budget 0.5000; token")
    assert _plan_line({"policy": "ranks-file"}) == "ranks-file"


def test_a_budget_below_the_blocks_floor_is_reached_through_the_embedding():
    from llmrom.plan.ranks import smallest_reachable
    model = tiny_model("gemma3")
    total = count_params(model)
    floor = smallest_reachable(total, linear_shapes(model, layout_for(model), True))
    cfg = CompressConfig(budget=round(floor - 0.02, 3), nsamples=16, seqlen=16, batch_size=4)
    compressed, report = llmrom.compress(tiny_model("gemma3"), TinyTokenizer(), cfg, tokens=calib_tokens(16, 16),
                                         progress=False)
    assert "embedding" in report["plan"] and count_params(compressed) <= cfg.budget * total
    with pytest.raises(LlmromError, match=r"budget 0.01 cannot be reached: even with every block linear at rank 1 "
                                          r"and the token embedding at rank \d+"):
        llmrom.compress(model, TinyTokenizer(), CompressConfig(budget=0.01, nsamples=16, seqlen=16),
                        tokens=calib_tokens(16, 16), progress=False)
