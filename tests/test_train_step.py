"""The distributed step, evaluation gather, loss, schedule and the Ray Train loop, on real processes.

Two Ray Train workers (MultiWorkerMirroredStrategy over loopback) run the building blocks of
cxr.training on in-memory data and write what they hold to a temp dir; the test process compares that
with a single-process run of the same code (default strategy = one worker with the global batch).
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys

# Ray's TF backend must write loopback addresses into TF_CONFIG; set before Ray starts so workers inherit it.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from cxr import config, losses  # noqa: E402
from cxr.data.source import DataSource  # noqa: E402
from cxr.evaluation.metrics import auroc_per_finding, mean_auroc  # noqa: E402
from cxr.inference import predict_split  # noqa: E402
from cxr.labels import NUM_FINDINGS  # noqa: E402
from cxr.models import build_model, zoo  # noqa: E402
from cxr.models.weights import load_initial_weights  # noqa: E402
from cxr.training import checkpoints, driver  # noqa: E402
from cxr.training.schedule import Schedule  # noqa: E402
from cxr.training.step import DistributedSteps, all_reduce, make_optimizer, make_strategy  # noqa: E402

S = 32  # image size: small_cnn at 32 px keeps every step in milliseconds
B = 4  # per-worker batch
N_VAL = 37  # odd, so the two workers hold different numbers of eval batches


def arrays(n: int, seed: int, size: int = S) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness carries the first findings, so a model can learn something."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, NUM_FINDINGS)) < 0.3).astype(np.float32)
    y[0], y[1] = 0.0, 1.0  # every finding has both classes
    x = 0.6 * rng.random((n, size, size, 1), dtype=np.float32)
    x[:, : size // 2] += 0.4 * y[:, None, None, :1]
    return x, y


def uneven_val_shard(rank: int, batch: int = 8) -> tf.data.Dataset:
    """Worker 0 holds 28 shuffled images (4 batches), worker 1 holds 9 (2 batches, last of one)."""
    x, y = arrays(N_VAL, seed=1)
    order = np.random.default_rng(7).permutation(N_VAL)
    mine = order[:28] if rank == 0 else order[28:]
    return tf.data.Dataset.from_tensor_slices((x[mine], y[mine], mine.astype(np.int64))).batch(batch)


def plain_cnn(init: str | None = None) -> keras.Model:
    """small_cnn without batch norm: each example's gradient is independent of its batch."""
    model = zoo.small_cnn(S, batch_norm=False)
    if init:
        load_initial_weights(model, init)
    return model


def gather(steps: DistributedSteps, batches: tf.data.Dataset, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The validation gather as the loop runs it: predict locally, one all-reduce across the workers."""
    preds = predict_split(steps.predict, batches, n, reduce=lambda rows: all_reduce(steps.strategy, rows))
    return preds.probs, preds.labels


def flat_weights(model: keras.Model) -> np.ndarray:
    return np.concatenate([np.asarray(w, np.float64).ravel() for w in model.get_weights()])


# ------------------------------------------------------------------------ what each worker runs


def mechanics_worker(cfg: dict) -> None:
    """On each Ray worker: one step per precision, BN sync, and the eval gather; results to cfg['out']."""
    import ray.train

    strategy = make_strategy()
    rank = ray.train.get_context().get_world_rank()
    x, y = arrays(2 * B, seed=0)
    mine = slice(rank * B, (rank + 1) * B)
    save = functools.partial(_save, cfg["out"], rank)
    save("float32", **_float32_step(strategy, cfg["init"], x[mine], y[mine]))
    save("bn", **_bn_sync(strategy, x[mine], y[mine]))
    save("bf16", **_bf16_steps(strategy, x[mine], y[mine]))
    y_bad = np.full_like(y[mine], np.nan) if rank == 1 else y[mine]  # inf/nan gradients on one worker only
    save("fp16", **_fp16_skip(strategy, cfg["init"], x[mine], y_bad, y[mine]))
    save("dropout", **dropout_forward(strategy, x))


def _save(directory: str, rank: int, check: str, **results: np.ndarray) -> None:
    np.savez(os.path.join(directory, f"{check}-{rank}.npz"), **results)


def _float32_step(strategy, init: str, x, y) -> dict:
    keras.mixed_precision.set_global_policy("float32")
    with strategy.scope():
        model = plain_cnn(init)
        sgd = keras.optimizers.SGD(0.5)  # SGD: the update is lr x gradient, so a wrong scale shows
        sgd.build(model.trainable_variables)
    steps = DistributedSteps(strategy, model, sgd, losses.binary_crossentropy(), global_batch=2 * B)
    out = steps.train_step(x, y).numpy()
    probs, labels = gather(steps, uneven_val_shard(ray_rank()), N_VAL)
    return {"weights": flat_weights(model), "step_out": out, "probs": probs, "labels": labels}


def _bn_sync(strategy, x, y) -> dict:
    keras.mixed_precision.set_global_policy("float32")
    with strategy.scope():
        inputs = keras.Input((S, S, 1))
        h = keras.layers.Conv2D(4, 3)(inputs)
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(NUM_FINDINGS, activation="sigmoid")(h))
        opt = keras.optimizers.SGD(0.1)
        opt.build(model.trainable_variables)
    steps = DistributedSteps(strategy, model, opt, losses.binary_crossentropy(), global_batch=2 * B)
    steps.train_step(x, y)
    bn = model.get_layer("bn")
    before = np.concatenate([bn.moving_mean.numpy(), bn.moving_variance.numpy()])
    steps.sync_moving_statistics()
    after = np.concatenate([bn.moving_mean.numpy(), bn.moving_variance.numpy()])
    return {"before": before, "after": after}


def _bf16_steps(strategy, x, y) -> dict:
    """The real small_cnn (batch norm), random init: MWMS must broadcast worker 0's initial values."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    keras.utils.set_random_seed(100 + ray_rank())  # different local initial values on each worker
    try:
        with strategy.scope():
            model = build_model("small_cnn", S)
            opt = make_optimizer(1e-3, "mixed_bfloat16")
            opt.build(model.trainable_variables)
        steps = DistributedSteps(strategy, model, opt, losses.binary_crossentropy(), global_batch=2 * B)
        outs = np.stack([steps.train_step(x, y).numpy() for _ in range(2)])
        trainable = np.concatenate([np.ravel(v.numpy()) for v in model.trainable_variables])
        return {"weights": trainable, "outs": outs}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _fp16_skip(strategy, init: str, x, y_first, y_second) -> dict:
    """Step 1 has non-finite gradients on one worker: both must skip it (and not hang); step 2 applies."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with strategy.scope():
            model = plain_cnn(init)
            opt = make_optimizer(1e-3, "mixed_float16")
            opt.build(model.trainable_variables)
        steps = DistributedSteps(strategy, model, opt, losses.binary_crossentropy(), global_batch=2 * B)
        steps.train_step(x, y_first)
        after_bad = flat_weights(model)
        scale = float(opt.dynamic_scale.numpy())
        steps.train_step(x, y_second)
        return {"after_bad": after_bad, "scale": np.array(scale), "after_good": flat_weights(model)}
    finally:
        keras.mixed_precision.set_global_policy("float32")


def dropout_forward(strategy, x) -> dict:
    """Two training-mode forward passes of small_cnn with dropout 0.5, the same weights and images on every
    replica (seeded as the loop seeds them): what each local replica outputs, [pass, replica, ...]."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(11)
    with strategy.scope():
        model = build_model("small_cnn", S, dropout=0.5)
        opt = make_optimizer(1e-3, "float32")
        opt.build(model.trainable_variables)
    steps = DistributedSteps(strategy, model, opt, losses.binary_crossentropy(), global_batch=len(x), seed=11)
    forward = tf.function(lambda images: strategy.run(lambda i: model(i, training=True), args=(images,)))
    outs = [np.stack([o.numpy() for o in strategy.experimental_local_results(forward(x))]) for _ in range(2)]
    return {"outs": np.stack(outs), "draws": np.array(steps.dropout_draws())}


def ray_rank() -> int:
    import ray.train

    return ray.train.get_context().get_world_rank()


# ----------------------------------------------------------------------------- in-memory pipeline


def memory_dataset(marks: str, data, split, batch_size, worker_index=0, num_workers=1, training=False,
                   epoch=0) -> tf.data.Dataset:
    """The DataSource contract on arrays; leaves a mark per (worker, split, epoch) it was asked for."""
    open(os.path.join(marks, f"{split}-w{worker_index}-e{epoch}-{'train' if training else 'eval'}"), "w").close()
    x, y = arrays(memory_size(data, split), seed=0 if split == "train" else 1, size=data.image_size)
    seed = data.seed
    mine = np.arange(len(x))[worker_index::num_workers]
    if training:
        ds = tf.data.Dataset.from_tensor_slices((x[mine], y[mine])).shuffle(len(mine), seed=seed + epoch)
        return ds.batch(batch_size, drop_remainder=True).repeat()
    return tf.data.Dataset.from_tensor_slices((x[mine], y[mine], mine.astype(np.int64))).batch(batch_size)


def memory_size(data, split: str) -> int:
    return 48 if split == "train" else N_VAL


def memory_counts(data, split: str) -> tuple[list[int], int]:
    _, y = arrays(memory_size(data, split), seed=0)
    return [int(c) for c in y.sum(axis=0)], len(y)


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ray_cluster():
    import ray
    from ray import cloudpickle

    from cxr.cluster import stop_local

    stop_local()  # an earlier module's scoring may have left cxr's local Ray running in this process
    # Workers cannot import this test module; ship its functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def init_weights(tmp_path_factory) -> str:
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(3)
    path = str(tmp_path_factory.mktemp("init") / "small_cnn.weights.h5")
    plain_cnn().save_weights(path)
    return path


@pytest.fixture(scope="module")
def two_workers(ray_cluster, init_weights, tmp_path_factory) -> dict[str, list[dict]]:
    """Run `mechanics_worker` on 2 Ray Train workers; {check name: [rank 0 arrays, rank 1 arrays]}."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    out = tmp_path_factory.mktemp("mechanics")
    trainer = TensorflowTrainer(
        mechanics_worker, train_loop_config={"out": str(out), "init": init_weights},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="mechanics", storage_path=str(out / "ray")))
    trainer.fit()
    names = ("float32", "bn", "bf16", "fp16", "dropout")
    return {n: [dict(np.load(out / f"{n}-{r}.npz")) for r in (0, 1)] for n in names}


def single_process_step(init: str) -> tuple[DistributedSteps, np.ndarray]:
    """The float32 SGD step of one worker holding the whole global batch (default strategy)."""
    keras.mixed_precision.set_global_policy("float32")
    strategy = make_strategy()
    model = plain_cnn(init)
    sgd = keras.optimizers.SGD(0.5)
    steps = DistributedSteps(strategy, model, sgd, losses.binary_crossentropy(), global_batch=2 * B)
    x, y = arrays(2 * B, seed=0)
    out = steps.train_step(x, y).numpy()
    return steps, out


# ------------------------------------------------------------------------------ two-worker checks


@pytest.mark.slow
def test_weights_identical_on_both_workers_after_a_step(two_workers):
    w0, w1 = (r["weights"] for r in two_workers["float32"])
    assert np.array_equal(w0, w1)
    b0, b1 = (r["weights"] for r in two_workers["bf16"])
    assert np.array_equal(b0, b1)


@pytest.mark.slow
def test_two_workers_batch_b_equal_one_worker_batch_2b(two_workers, init_weights):
    steps, out = single_process_step(init_weights)
    reference = flat_weights(steps.model)
    distributed = two_workers["float32"][0]["weights"]
    initial = flat_weights(plain_cnn(init_weights))
    assert np.abs(reference - initial).max() > 1e-3  # the step moved the weights noticeably
    np.testing.assert_allclose(distributed, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(two_workers["float32"][0]["step_out"][0], out[0], rtol=1e-5)  # global mean loss


@pytest.mark.slow
def test_eval_gather_gives_every_worker_the_single_process_predictions(two_workers, init_weights):
    steps, _ = single_process_step(init_weights)  # the model both workers hold after their step
    x, y = arrays(N_VAL, seed=1)
    expected = steps.model(x, training=False).numpy()
    for rank in (0, 1):
        got = two_workers["float32"][rank]
        np.testing.assert_array_equal(got["labels"], y)
        np.testing.assert_allclose(got["probs"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(two_workers["float32"][0]["probs"], two_workers["float32"][1]["probs"])


@pytest.mark.slow
def test_bn_moving_statistics_are_averaged_across_workers(two_workers):
    before = [r["before"] for r in two_workers["bn"]]
    after = [r["after"] for r in two_workers["bn"]]
    assert not np.allclose(before[0], before[1])  # each worker saw its own batch
    np.testing.assert_allclose(after[0], (before[0] + before[1]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(after[0], after[1])


@pytest.mark.slow
def test_each_worker_draws_its_own_dropout_masks(two_workers):
    (out0, draws0), (out1, draws1) = ((r["outs"][:, 0], r["draws"]) for r in two_workers["dropout"])
    assert draws0.tolist() == draws1.tolist() == [2]  # one generator, two draws on each worker
    for draw in (0, 1):
        assert not np.allclose(out0[draw], out1[draw])  # same weights and images, other masks
    assert not np.allclose(out0[0], out0[1])  # and new masks each draw


@pytest.mark.slow
def test_bf16_steps_have_finite_loss_gradients_and_weights(two_workers):
    for rank in (0, 1):
        got = two_workers["bf16"][rank]
        assert np.all(np.isfinite(got["outs"])) and np.all(got["outs"][:, 1] > 0)
        assert np.all(np.isfinite(got["weights"]))


@pytest.mark.slow
def test_fp16_nonfinite_gradients_on_one_worker_skip_the_step_on_both(two_workers, init_weights):
    initial = flat_weights(plain_cnn(init_weights))
    for rank in (0, 1):
        got = two_workers["fp16"][rank]
        np.testing.assert_array_equal(got["after_bad"], initial)
        assert float(got["scale"]) == keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD()).initial_scale / 2
        assert not np.array_equal(got["after_good"], initial)
    np.testing.assert_array_equal(two_workers["fp16"][0]["after_good"], two_workers["fp16"][1]["after_good"])


# ----------------------------------------------------------------------------- the whole loop


def fit_config(storage: str, epochs: int) -> config.Config:
    return config.validate({
        "data": {"manifest_uri": "memory://", "image_size": S},
        "model": {"dropout": 0.2},
        "optim": {"batch_size": B, "epochs": epochs, "lr": 3e-3, "weighted_loss": True, "steps_per_log": 2},
        "scaling": {"num_workers": 2, "precision": "float32"},
        "run": {"storage_path": storage, "name": "loop", "checkpoints_to_keep": 1},
    })


def fit(cfg: config.Config, source: DataSource) -> dict:
    """What `cxr train` does before scoring: plan, run Ray Train, summarise."""
    return driver.summarize(driver.run_trainer(cfg, source, driver.plan_run(cfg, source)))


@pytest.mark.slow
def test_fit_two_workers_checkpoints_and_resumes(ray_cluster, tmp_path):
    marks = tmp_path / "marks"
    marks.mkdir()
    source = DataSource(functools.partial(memory_dataset, str(marks)), memory_size, memory_counts)

    first = fit(fit_config(str(tmp_path / "ray"), epochs=2), source)
    assert first["epochs_done"] == 2
    latest = first["latest_checkpoint"]
    assert sorted(os.listdir(latest)) == sorted([checkpoints.MODEL_FILE, checkpoints.OPTIMIZER_FILE,
                                                 checkpoints.STATE_FILE, checkpoints.CONFIG_FILE])
    state = json.loads(open(os.path.join(latest, checkpoints.STATE_FILE)).read())
    assert state["epoch"] == 2 and state["plan"]["steps_per_epoch"] == 48 // (2 * B)
    assert state["dropout_draws"] == [2 * 48 // (2 * B)]  # one mask per step so far
    assert state["plan"]["positives"] == memory_counts(None, "train")[0]

    second = fit(fit_config(str(tmp_path / "ray"), epochs=3), source)
    assert second["epochs_done"] == 3
    state = json.loads(open(os.path.join(second["latest_checkpoint"], checkpoints.STATE_FILE)).read())
    assert state["dropout_draws"] == [3 * 48 // (2 * B)]  # the resumed run continued the draws
    trained = sorted(m for m in os.listdir(marks) if m.endswith("-train"))
    assert trained == [f"train-w{w}-e{e}-train" for w in (0, 1) for e in (1, 2, 3)]  # epoch 3 only once
    with np.load(os.path.join(second["latest_checkpoint"], checkpoints.OPTIMIZER_FILE)) as saved:
        names = saved["names"].tolist()
        assert int(saved[f"v{names.index('adam/iteration')}"]) == 3 * (48 // (2 * B))

    # The best checkpoint reproduces its reported validation AUROC in a fresh process-local model.
    best = second["best_checkpoint"]
    model = build_model("small_cnn", S, weights=os.path.join(best, checkpoints.MODEL_FILE))
    x, y = arrays(N_VAL, seed=1)
    score = mean_auroc(auroc_per_finding(y, model(x, training=False).numpy()))
    assert score == pytest.approx(second["best_val_auroc_mean"], abs=1e-6)
    assert second["metrics"]["best_val_auroc_mean"] == pytest.approx(second["best_val_auroc_mean"])


# ------------------------------------------------------------------------- single-process pieces


def test_gather_rejects_missing_duplicate_and_stray_indices():
    keras.mixed_precision.set_global_policy("float32")
    strategy = make_strategy()
    model = build_model("small_cnn", S)
    steps = DistributedSteps(strategy, model, keras.optimizers.SGD(), losses.binary_crossentropy(), 1)
    x, y = arrays(6, seed=2)
    for index in ([0, 1, 2, 3, 4, 4], [0, 1, 2, 3, 4, 9]):
        ds = tf.data.Dataset.from_tensor_slices((x, y, np.array(index, np.int64))).batch(4)
        with pytest.raises(RuntimeError, match="exactly once"):
            gather(steps, ds, 6)
    ds = tf.data.Dataset.from_tensor_slices((x, y, np.arange(6, dtype=np.int64))).batch(4)
    probs, labels = gather(steps, ds, 6)
    np.testing.assert_array_equal(labels, y)
    assert probs.shape == (6, NUM_FINDINGS)


def test_wang_weights_and_weighted_bce():
    beta_p, beta_n = losses.wang_weights([1, 3, 0] + [2] * 11, total=4)
    np.testing.assert_allclose(beta_p[:3], [4.0, 4 / 3, 1.0])
    np.testing.assert_allclose(beta_n[:3], [4 / 3, 4.0, 1.0])
    rng = np.random.default_rng(0)
    y = (rng.random((5, NUM_FINDINGS)) < 0.4).astype(np.float32)
    p = rng.uniform(0.05, 0.95, (5, NUM_FINDINGS)).astype(np.float32)
    expected = -(beta_p * y * np.log(p) + beta_n * (1 - y) * np.log(1 - p)).mean(axis=1)
    got = keras.ops.convert_to_numpy(losses.binary_crossentropy(beta_p, beta_n)(y, p))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    plain = keras.ops.convert_to_numpy(losses.binary_crossentropy()(y, p))
    np.testing.assert_allclose(plain, keras.ops.convert_to_numpy(keras.losses.binary_crossentropy(y, p)), rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        losses.wang_weights([5] * NUM_FINDINGS, total=4)


def test_schedule_plateau_early_stop_and_resume():
    s = Schedule(lr=1e-3, patience=1, factor=0.1, min_lr=2e-6, stop_patience=3)
    assert s.update(0, 0.70) and s.best_epoch == 0
    assert not s.update(1, 0.69) and s.lr == pytest.approx(1e-4)  # one epoch without gain: /10
    assert s.update(2, 0.75) and s.lr == pytest.approx(1e-4)
    assert not s.update(3, math.nan) and s.lr == pytest.approx(1e-5)  # undefined AUROC is no gain
    resumed = Schedule(lr=1e-3, patience=1, factor=0.1, min_lr=2e-6, stop_patience=3).restored(
        json.loads(json.dumps(s.state())))
    assert resumed == s
    assert not resumed.update(4, 0.74) and resumed.lr == pytest.approx(2e-6)  # floored at min_lr
    assert not resumed.stopped
    assert not resumed.update(5, 0.74) and resumed.stopped and resumed.best_epoch == 2


def test_cosine_schedule_decays_whatever_the_scores_and_resumes_exactly():
    s = Schedule(lr=1e-3, kind="cosine", epochs=4, min_lr=1e-5, stop_patience=3)
    lrs = [s.lr]  # the rate each epoch trains at, then the one after the last
    for epoch, score in enumerate([0.70, 0.60, 0.60, 0.80], start=1):  # two stalls would cut a plateau's rate
        s.update(epoch, score)
        lrs.append(s.lr)
    half_cosine = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    np.testing.assert_allclose(lrs, [*half_cosine, 1e-5], rtol=1e-12)
    assert lrs[2] == pytest.approx(0.505e-3) and s.best_epoch == 4 and not s.stopped

    fresh = Schedule(lr=1e-3, kind="cosine", epochs=4, min_lr=1e-5, stop_patience=3)
    fresh.update(1, 0.70)
    fresh.update(2, 0.60)
    resumed = Schedule(lr=1e-3, kind="cosine", epochs=4, min_lr=1e-5, stop_patience=3).restored(
        json.loads(json.dumps(fresh.state())))
    assert resumed == fresh and resumed.lr == lrs[2]  # exactly, not approximately
    resumed.update(3, 0.60)
    assert resumed.lr == lrs[3] and resumed.peak_lr == 1e-3  # from the configured peak, not the restored rate

    with pytest.raises(ValueError, match="number of epochs"):
        Schedule(lr=1e-3, kind="cosine")
    with pytest.raises(ValueError, match="plateau, cosine"):
        Schedule(lr=1e-3, kind="step")
    with pytest.raises(config.ConfigError, match="min_lr .* must be below lr"):
        config.validate({"data": {"manifest_uri": "memory://"},
                         "optim": {"lr_schedule": "cosine", "lr": 1e-3, "min_lr": 1e-3}})
    assert config.validate({"data": {"manifest_uri": "memory://"}}).optim.lr_schedule == "plateau"


def test_dropout_resumes_exactly_from_a_checkpoint(tmp_path):
    """Like the cosine rate: a run interrupted after two steps and resumed from its checkpoint (dropout 0.5)
    gives the uninterrupted run's losses and weights bit for bit, because the dropout draws are checkpointed."""
    keras.mixed_precision.set_global_policy("float32")
    x, y = arrays(4 * B, seed=4)
    batches = [(x[i * B:(i + 1) * B], y[i * B:(i + 1) * B]) for i in range(4)]
    initial = build_model("small_cnn", S, dropout=0.5).get_weights()

    def fresh() -> DistributedSteps:
        model = build_model("small_cnn", S, dropout=0.5)
        model.set_weights(initial)
        opt = keras.optimizers.Adam(1e-3, name="adam")  # one name in every run: the checkpoint keys by it
        opt.build(model.trainable_variables)
        return DistributedSteps(make_strategy(), model, opt, losses.binary_crossentropy(), B, seed=7)

    def train(steps: DistributedSteps, part: list) -> list[np.ndarray]:
        return [steps.train_step(xb, yb).numpy() for xb, yb in part]

    whole = fresh()
    uninterrupted = train(whole, batches)
    first = fresh()
    before = train(first, batches[:2])
    checkpoints.save_checkpoint(str(tmp_path), first.model, first.optimizer,
                                {"epoch": 1, "dropout_draws": first.dropout_draws()}, "")
    assert checkpoints.read_state(str(tmp_path))["dropout_draws"] == [2]

    def resume(with_draws: bool) -> tuple[list[np.ndarray], np.ndarray]:
        steps = fresh()
        state = checkpoints.restore_checkpoint(str(tmp_path), steps.model, steps.optimizer)
        if with_draws:
            steps.seed_dropout(state["dropout_draws"])  # what the loop's restore does
        return before + train(steps, batches[2:]), flat_weights(steps.model)

    resumed, weights = resume(with_draws=True)
    np.testing.assert_array_equal(np.stack(resumed), np.stack(uninterrupted))
    np.testing.assert_array_equal(weights, flat_weights(whole.model))
    replayed, _ = resume(with_draws=False)  # the first two steps' masks again: another run
    assert not np.array_equal(np.stack(replayed), np.stack(uninterrupted))
    with pytest.raises(ValueError, match="2 dropout random streams saved, the model has 1"):
        whole.seed_dropout([1, 2])


MIRRORED_DROPOUT = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import test_train_step as t
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
np.save(sys.argv[1], t.dropout_forward(strategy, t.arrays(t.B, seed=0)[0])["outs"])
"""


def test_each_replica_of_a_strategy_draws_its_own_dropout_masks(tmp_path):
    """Two replicas in one process (MirroredStrategy over two logical CPUs, so a child process)."""
    out = tmp_path / "outs.npy"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    subprocess.run([sys.executable, "-c", MIRRORED_DROPOUT, str(out)], check=True, env=env, timeout=300)
    outs = np.load(out)  # [pass, replica, B, 14]
    assert outs.shape == (2, 2, B, NUM_FINDINGS)
    for draw in (0, 1):
        assert not np.allclose(outs[draw, 0], outs[draw, 1])
    assert not np.allclose(outs[0, 0], outs[1, 0])


def test_plan_checks_sizes_before_any_worker_starts():
    cfg = fit_config("/tmp/unused", epochs=1)
    source = DataSource(memory_dataset, memory_size, memory_counts)
    plan = driver.plan_run(cfg, source)
    assert (plan.train_size, plan.val_size, plan.steps_per_epoch) == (48, N_VAL, 48 // (2 * B))
    assert plan.positives == memory_counts(None, "train")[0] and plan.total == 48
    small = DataSource(memory_dataset, lambda data, split: 3, memory_counts)
    with pytest.raises(ValueError, match="fewer than one global batch of 8"):
        driver.plan_run(cfg, small)
