"""Five successive 10 % deletion requests vs one 50 % request vs retraining on the remainder."""

import jax.numpy as jnp
import numpy as np
import pytest

from mini_unlearn_jax.app.checkpoint import load_run
from mini_unlearn_jax.app.cli import main
from mini_unlearn_jax.app.data import load_dataset
from mini_unlearn_jax.core import methods as M
from mini_unlearn_jax.core import registry as R
from mini_unlearn_jax.core.models import init_params
from mini_unlearn_jax.evaluation.metrics import mean_kl, predict_probs, rel_param_error

SPEC = "synthetic:n=500,n_test=300,d=8,classes=3,seed=11,sep=1.0"


@pytest.mark.slow
def test_five_sequential_requests_match_one_request_and_retraining(tmp_path):
    run = tmp_path / "r0"
    assert main(["train", "--data", SPEC, "--model", "logreg", "--l2", "1e-2", "--out", str(run)]) == 0
    chunks = np.array_split(np.random.default_rng(0).permutation(500)[:250], 5)
    prev = run
    for i, c in enumerate(chunks):
        np.save(tmp_path / f"f{i}.npy", c)
        nxt = tmp_path / f"r{i + 1}"
        assert main(["unlearn", "--run", str(prev), "--method", "mini", "--forget", str(tmp_path / f"f{i}.npy"),
                     "--out", str(nxt)]) == 0
        prev = nxt
    np.save(tmp_path / "all.npy", np.concatenate(chunks))
    assert main(["unlearn", "--run", str(run), "--method", "mini", "--forget", str(tmp_path / "all.npy"),
                 "--out", str(tmp_path / "once")]) == 0
    chain, once, orig = load_run(prev), load_run(tmp_path / "once"), load_run(run)
    assert len(chain.meta["ledger"]) == 5 and chain.removed.size == 250
    np.testing.assert_array_equal(np.sort(chain.removed), np.sort(once.removed))
    ds = load_dataset(SPEC)
    problem = M.Problem(orig.objective, orig.train_config, init_params(orig.model, ds.x_train[0], 0), orig.params,
                        orig.snapshots, orig.stats, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train))
    ret = R.run_method("retrain", problem, np.concatenate(chunks))
    p_ret = predict_probs(orig.objective, ret.params, ds.x_test)
    kl_orig = mean_kl(p_ret, predict_probs(orig.objective, orig.params, ds.x_test))
    for name, r in (("chain", chain), ("once", once)):
        rel = rel_param_error(r.params, ret.params, orig.params)
        kl = mean_kl(p_ret, predict_probs(orig.objective, r.params, ds.x_test))
        print(name, rel, kl / kl_orig)
        assert rel < 0.3, (name, rel)
        assert kl < 0.05 * kl_orig, (name, kl, kl_orig)


@pytest.mark.slow
def test_refresh_keeps_nothing_of_the_trained_buffer():
    """After a removal the buffer holds only entries computed on the remaining data at or around
    the new model: every written entry holds the remaining-data gradient at its own parameters,
    none holds parameters of the trained buffer, the EKFAC path keeps only the newest entry and
    the pairing path (MLP) fills the buffer with probes whose secant pairs are usable."""
    import jax

    from mini_unlearn_jax.core import linalg as cv
    from mini_unlearn_jax.core.models import build_model, make_objective
    from mini_unlearn_jax.core.training import TrainConfig, Trainer

    ds = load_dataset("synthetic:n=200,n_test=50,d=5,classes=3,seed=4")
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    forget = np.arange(0, 200, 4)
    keep = np.setdiff1d(np.arange(200), forget)
    for name in ("mlp", "logreg"):
        model = build_model(name, 3, hidden=8)
        obj = make_objective(model, 1e-3)
        cfg = TrainConfig(optimizer="adam", steps=60, batch_size=50, learning_rate=1e-2, snapshots=4, snapshot_every=10)
        p0 = init_params(model, ds.x_train[0], 0)
        st = Trainer(obj, cfg).fit(p0, x, y)
        stats = cv.fit_stats(obj, st.params, x)
        problem = M.Problem(obj, cfg, p0, st.params, st.snapshots, stats, x, y)
        new_params = jax.tree.map(lambda a: a * 0.9, st.params)  # stands in for an unlearned model
        nxt = M.refresh_for_next_request(problem, new_params, forget).problem
        snaps, old = nxt.snapshots, st.snapshots
        K = snaps.steps.shape[0]
        written = [k for k in range(K) if int(snaps.steps[k]) >= 0]
        assert len(written) == int(snaps.count) == (K if name == "mlp" else 1)
        newest = (int(snaps.count) - 1) % K
        for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a, i=newest: a[i], snaps.params)), jax.tree.leaves(new_params),
                        strict=True):
            np.testing.assert_array_equal(a, b)
        old_rows = np.stack([np.concatenate([np.ravel(a[j]) for a in jax.tree.leaves(old.params)]) for j in range(K)])
        for k in range(K):
            p_k = jax.tree.map(lambda a, k=k: a[k], snaps.params)
            row = np.concatenate([np.ravel(a) for a in jax.tree.leaves(p_k)])
            assert not any(np.array_equal(row, o) for o in old_rows), (name, k)
            if k not in written:
                assert not np.any(row) and not any(np.any(g[k]) for g in jax.tree.leaves(snaps.grads))
                continue
            g_k = jax.tree.map(lambda a, k=k: a[k], snaps.grads)
            want = jax.grad(obj.data_loss)(p_k, x[keep], y[keep])
            for a, b in zip(jax.tree.leaves(g_k), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
        if name == "mlp":  # the probes' secant pairs carry curvature (s^T y > 0 for some pair)
            from mini_unlearn_jax.core.snapshots import ordered

            o = ordered(snaps)
            flat = lambda t, K=K: jnp.stack([jnp.concatenate([jnp.ravel(a[j]) for a in jax.tree.leaves(t)]) for j in range(K)])
            _, _, ok = cv.secant_pairs(flat(o.params), flat(o.grads), o.count)
            assert bool(jnp.any(ok))
        assert (nxt.stats is None) == (name == "mlp")
