"""Five successive 10 % deletion requests vs one 50 % request vs retraining on the remainder."""

import jax.numpy as jnp
import numpy as np

from mini_unlearn_jax import methods as M
from mini_unlearn_jax.checkpoint import load_run
from mini_unlearn_jax.cli import main
from mini_unlearn_jax.data import load_dataset
from mini_unlearn_jax.metrics import mean_kl, predict_probs, rel_param_error
from mini_unlearn_jax.models import init_params

SPEC = "synthetic:n=500,n_test=300,d=8,classes=3,seed=11,sep=1.0"


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
    ret = M.run_method("retrain", problem, np.concatenate(chunks))
    p_ret = predict_probs(orig.objective, ret.params, ds.x_test)
    kl_orig = mean_kl(p_ret, predict_probs(orig.objective, orig.params, ds.x_test))
    for name, r in (("chain", chain), ("once", once)):
        rel = rel_param_error(r.params, ret.params, orig.params)
        kl = mean_kl(p_ret, predict_probs(orig.objective, r.params, ds.x_test))
        print(name, rel, kl / kl_orig)
        assert rel < 0.3, (name, rel)
        assert kl < 0.05 * kl_orig, (name, kl, kl_orig)
