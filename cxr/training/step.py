"""The distributed training step: one replica per Ray Train worker, models kept identical by tf.distribute.

Why a hand-written step instead of `model.fit`: Keras 3's `fit` cannot run under
MultiWorkerMirroredStrategy (MWMS) with two or more workers, while `strategy.run` + `strategy.reduce`
in a `tf.function` on a Keras 3 model can. Each worker is one replica:

- Train step: every replica computes its per-example loss, scales it by the GLOBAL batch
  (`tf.nn.compute_average_loss`), takes gradients, and the Keras optimizer all-reduces (sums) them
  before applying, so each worker applies the same update, equal to one worker with the global
  batch. Under mixed_float16 a LossScaleOptimizer scales the loss; ours agrees across replicas on
  whether the gradients are finite, so no worker can skip an all-reduce that the others enter.
- Batch norm: per-replica batch statistics (standard MWMS; the backbones' keras.applications BN
  layers are used as they are). Synchronised BN would add one all-reduce per BN layer per step (121
  for DenseNet-121) for no gain at the 16+ images per replica we train with, and CheXNet itself
  used batches of 16. Keras' moving mean/variance are per-worker variables, so once per epoch,
  before validation, they are averaged across workers (one all-reduce): every worker then
  evaluates and checkpoints the same model. The same holds for `small_cnn`, which uses BN too.
- Dropout: Keras draws each Dropout layer's masks from a SeedGenerator whose state is a variable, mirrored
  like the weights (worker 0's initial value everywhere) but updated locally, so every replica would draw the
  same masks. Each replica's generators are reseeded from (seed, replica, generator), and the number of
  draws so far is what a checkpoint keeps to continue the streams exactly.
- Evaluation never runs a collective per batch (workers may hold different numbers of batches): each
  worker predicts its part of the split locally and one `all_reduce` gathers the rows
  (`cxr.inference.predict_split`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from cxr.losses import LossFn

# ------------------------------------------------------------------ precision, strategy, optimizer


def make_strategy() -> tf.distribute.Strategy:
    """MWMS when Ray's TF backend has set TF_CONFIG, else the default (single-process) strategy.

    MWMS must be created before any other TensorFlow op runs in the process.
    """
    if "TF_CONFIG" in os.environ:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


class ReplicaSyncedLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """A LossScaleOptimizer whose finite-gradient check is agreed by all replicas.

    The stock check looks at local gradients only; under MWMS a worker with an inf gradient would skip
    the inner optimizer (and its gradient all-reduce) while the others wait in it forever.
    """

    def check_finite(self, grads):
        finite = super().check_finite(grads)
        ctx = tf.distribute.get_replica_context()
        if ctx is None or ctx.num_replicas_in_sync == 1:
            return finite
        bad = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(finite), tf.float32))
        return tf.equal(bad, 0.0)


def make_optimizer(lr: float, precision: str) -> keras.optimizers.Optimizer:
    """Adam; wrapped for dynamic loss scaling under mixed_float16 (bfloat16 needs none)."""
    adam = keras.optimizers.Adam(learning_rate=lr)
    return ReplicaSyncedLossScaleOptimizer(adam) if precision == "mixed_float16" else adam


# ------------------------------------------------------------------------------------ the steps


class DistributedSteps:
    """The compiled train step, the local forward pass and the moving-statistics sync of one model."""

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model,
                 optimizer: keras.optimizers.Optimizer, loss_fn: LossFn, global_batch: int, seed: int = 0):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer
        self.loss_fn, self.global_batch, self.seed = loss_fn, global_batch, seed
        self.train_step = tf.function(self._train_step, reduce_retracing=True)
        self.predict = tf.function(lambda images: model(images, training=False), reduce_retracing=True)
        self.seed_dropout()

    def seed_dropout(self, draws: list[int] | None = None) -> None:
        """Give every replica its own dropout masks: generator k of replica r yields seeds (s(seed, r, k), n).

        Keras counts n up by one per draw; `draws` (n of each generator, from `dropout_draws` in a checkpoint)
        continues the streams where they were, else they start at 0.
        """
        states = random_states(self.model)
        draws = [0] * len(states) if draws is None else [int(n) for n in draws]
        if len(draws) != len(states):
            raise ValueError(f"{len(draws)} dropout random streams saved, the model has {len(states)}")
        if not states:
            return
        replicas = range(self.strategy.num_replicas_in_sync)
        seeds = tf.constant([[_stream_seed(self.seed, r, k) for k in range(len(states))] for r in replicas], tf.int64)

        def assign() -> None:
            r = tf.distribute.get_replica_context().replica_id_in_sync_group
            for k, (state, n) in enumerate(zip(states, draws, strict=True)):
                state.assign(tf.stack([seeds[r, k], tf.constant(n, tf.int64)]))  # local copy: aggregation "none"

        tf.function(lambda: self.strategy.run(assign))()

    def dropout_draws(self) -> list[int]:
        """Masks drawn so far by each dropout generator (the same count on every replica): the RNG's progress."""
        return [int(np.asarray(state.numpy())[1]) for state in random_states(self.model)]

    def _replica_step(self, images, labels):
        """One replica: loss over the global batch, gradients, optimizer update (which all-reduces)."""
        variables = self.model.trainable_variables
        with tf.GradientTape() as tape:
            probs = self.model(images, training=True)
            loss = tf.nn.compute_average_loss(self.loss_fn(labels, probs), global_batch_size=self.global_batch)
            scaled = self.optimizer.scale_loss(loss)
        grads = tape.gradient(scaled, variables)
        scale = getattr(self.optimizer, "dynamic_scale", None)
        grad_norm = tf.linalg.global_norm(grads) / (tf.cast(scale, tf.float32) if scale is not None else 1.0)
        self.optimizer.apply_gradients(zip(grads, variables, strict=True))
        return tf.stack([loss, grad_norm])

    def _train_step(self, images, labels):
        """Global mean loss and mean over workers of each worker's batch-mean gradient norm.

        A replica's gradient is its batch-mean gradient / num_replicas, so SUM of the local norms is
        the mean of the per-worker batch-mean gradient norms; one reduce carries both numbers.
        """
        per_replica = self.strategy.run(self._replica_step, args=(images, labels))
        return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

    def sync_moving_statistics(self) -> None:
        """Average float non-trainable variables (BN moving mean/variance) across workers, in one all-reduce."""
        variables = [v for v in self.model.non_trainable_variables if "float" in str(v.dtype)]
        if not variables or self.strategy.num_replicas_in_sync == 1:
            return
        local = np.concatenate([np.asarray(v.numpy(), np.float32).ravel() for v in variables])
        mean = all_reduce(self.strategy, local, tf.distribute.ReduceOp.MEAN)
        offset = 0
        for v in variables:
            size = int(np.prod(v.shape))
            v.assign(mean[offset:offset + size].reshape(v.shape))
            offset += size


def random_states(model: keras.Model) -> list:
    """The state variables of the model's keras.random.SeedGenerators (one per Dropout layer), in layer order."""
    return [v for v in model.non_trainable_variables if v.name == "seed_generator_state"]


def _stream_seed(seed: int, replica: int, generator: int) -> int:
    """A seed for one replica's generator, below 2**31 - 2 (Keras folds seeds into int32 with that modulus)."""
    return int(np.random.SeedSequence([seed, replica, generator]).generate_state(1, np.uint32)[0]) % (2**31 - 2)


def all_reduce(strategy: tf.distribute.Strategy, array: np.ndarray,
               op: tf.distribute.ReduceOp = tf.distribute.ReduceOp.SUM) -> np.ndarray:
    """`op` over all workers of `array`, element-wise; every worker must call this exactly once."""
    return _reducer(strategy, op)(tf.constant(array)).numpy()


@functools.cache
def _reducer(strategy: tf.distribute.Strategy, op: tf.distribute.ReduceOp) -> Callable:
    """One traced all-reduce per strategy and op, shape-generic: a new tf.function per call retraces every time."""

    def reduce(x):
        per_replica = strategy.run(tf.identity, args=(x,))  # placed on this replica's device
        return strategy.reduce(op, per_replica, axis=None)

    return tf.function(reduce, reduce_retracing=True)
