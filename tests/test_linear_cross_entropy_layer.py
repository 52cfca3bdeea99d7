"""Tests for keras_bn.layers.LinearCrossEntropyHead, against Keras's Dense +
SparseCategoricalCrossentropy on the same weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_bn
from keras_bn.layers import LinearCrossEntropyHead
from keras_bn.layers import per_token_loss

VOCAB, FEATURES, TOKENS = 13, 6, 5


def data(rng, batch=8, pad=None):
    x = rng.integers(0, VOCAB, size=(batch, TOKENS)).astype("int32")
    y = rng.integers(0, VOCAB, size=(batch, TOKENS)).astype("int32")
    if pad is not None:
        y[:, -2:] = pad  # the last two positions are padding
    w = rng.uniform(0.2, 2.0, size=(batch, TOKENS)).astype("float32")
    return x, y, w


def fused_model(head, seed=0, weighted=False):
    tokens = keras.Input((TOKENS,), dtype="int32")
    labels = keras.Input((TOKENS,), dtype="int32")
    embed = keras.layers.Embedding(VOCAB, FEATURES, name="embed")
    hidden = keras.layers.Dense(FEATURES, activation="tanh", name="mix")(embed(tokens))
    if not weighted:
        return keras.Model([tokens, labels], head([hidden, labels]))
    weights = keras.Input((TOKENS,), dtype="float32")
    return keras.Model([tokens, labels, weights], head([hidden, labels, weights]))


def dense_twin(fused):
    """Keras's own head on a copy of `fused`'s weights: logits, then the loss."""
    tokens = keras.Input((TOKENS,), dtype="int32")
    embed = keras.layers.Embedding(VOCAB, FEATURES, name="embed")
    hidden = keras.layers.Dense(FEATURES, activation="tanh", name="mix")(embed(tokens))
    logits = keras.layers.Dense(VOCAB, name="head")(hidden)
    model = keras.Model(tokens, logits)
    model.set_weights(fused.get_weights())
    return model


def compiled_twins(fused, options, jit_compile):
    """Compiles `fused` with the per-token loss and returns its dense twin,
    compiled with Keras's sparse loss under the same options."""
    dense = dense_twin(fused)
    if options.get("label_smoothing"):  # Keras's sparse loss has no smoothing
        keras_loss = _smoothed_sparse(options["label_smoothing"])
    else:
        keras_loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, **options
        )
    fused.compile(keras.optimizers.SGD(0.5), per_token_loss, jit_compile=jit_compile)
    dense.compile(keras.optimizers.SGD(0.5), keras_loss, jit_compile=jit_compile)
    return dense


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"ignore_class": 0}])
def test_fit_steps_equal_keras_dense_head(rng, jit_compile, options):
    """Two SGD steps with per-token sample weights (and padding) give Keras's
    losses and weights: the fused head learns what the dense one does."""
    pad = options.get("ignore_class")
    x, y, w = data(rng, pad=pad)
    fused = fused_model(
        LinearCrossEntropyHead(VOCAB, name="head", chunk_size=4, **options)
    )
    dense = compiled_twins(fused, options, jit_compile)
    got = fused.fit([x, y], y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    want = dense.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    np.testing.assert_allclose(got.history["loss"], want.history["loss"], rtol=1e-5)
    for a, b in zip(fused.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def _nan_backward(labels, hidden, kernel, bias, *args):
    """Stands for the per-token backward pass: NaN gradients if it runs."""
    return tuple(tf.fill(tf.shape(x), float("nan")) for x in (hidden, kernel, bias))


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1}, {"ignore_class": 0}])
@pytest.mark.parametrize("weighted", [False, True])
def test_fit_takes_the_fast_gradient(rng, jit_compile, options, weighted, monkeypatch):
    """`fit` without `sample_weight` (weights, if any, as the head's third
    input) averages with one weight per token: the gradient formed in the
    forward pass serves it (the per-token backward pass is replaced by NaNs
    here), and the steps equal Keras's dense head with `sample_weight`."""
    from keras_bn.ops import linear_cross_entropy

    monkeypatch.setattr(linear_cross_entropy, "_backward_loop", _nan_backward)
    x, y, w = data(rng, pad=options.get("ignore_class"))
    if not weighted:
        w = np.ones_like(w)
    head = LinearCrossEntropyHead(
        VOCAB, name="head", chunk_size=4, gradient_in_forward=True, **options
    )
    fused = fused_model(head, weighted=weighted)
    dense = compiled_twins(fused, options, jit_compile)
    inputs = [x, y, w] if weighted else [x, y]
    got = fused.fit(inputs, y, batch_size=4, shuffle=False, verbose=0)
    want = dense.fit(x, y, sample_weight=w, batch_size=4, shuffle=False, verbose=0)
    np.testing.assert_allclose(got.history["loss"], want.history["loss"], rtol=1e-5)
    for a, b in zip(fused.get_weights(), dense.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_without_the_fast_gradient_no_gradient_is_formed_forward(rng, monkeypatch):
    from keras_bn.ops import linear_cross_entropy_uniform

    def refuse(*args):
        raise AssertionError("the gradient was formed in the forward pass")

    monkeypatch.setattr(linear_cross_entropy_uniform, "forward_with_gradient", refuse)
    x, y, w = data(rng)
    head = LinearCrossEntropyHead(VOCAB)  # the default: False
    model = fused_model(head)
    model.compile(keras.optimizers.SGD(0.1), per_token_loss)
    model.fit([x, y], y, sample_weight=w, verbose=0)
    config = head.get_config()
    assert config["gradient_in_forward"] is False
    assert LinearCrossEntropyHead.from_config(config).gradient_in_forward is False


def _smoothed_sparse(smoothing):
    def loss(y_true, logits):
        onehot = tf.one_hot(tf.cast(y_true, tf.int32), VOCAB)
        return keras.losses.categorical_crossentropy(
            onehot, logits, from_logits=True, label_smoothing=smoothing
        )

    return loss


def test_float64_gradients_match_autodiff_with_leading_axes(rng):
    head = LinearCrossEntropyHead(VOCAB, chunk_size=5, dtype="float64")
    hidden = tf.constant(rng.normal(size=(2, 3, 4, FEATURES)))
    labels = tf.constant(rng.integers(0, VOCAB, size=(2, 3, 4)), tf.int32)
    upstream = tf.constant(rng.normal(size=(2, 3, 4)))
    head.build(hidden.shape)
    head.bias.assign(rng.normal(size=VOCAB))
    variables = [head.kernel, head.bias]
    with tf.GradientTape() as tape:
        tape.watch(hidden)
        loss = head([hidden, labels])
    got = tape.gradient(loss, [hidden] + variables, output_gradients=upstream)
    with tf.GradientTape() as tape:
        tape.watch(hidden)
        logits = head(hidden)
        want_loss = tf.reduce_logsumexp(logits, -1) - tf.gather(
            logits, labels, batch_dims=3
        )
    want = tape.gradient(want_loss, [hidden] + variables, output_gradients=upstream)
    assert loss.shape == labels.shape and logits.shape == (2, 3, 4, VOCAB)
    np.testing.assert_allclose(loss.numpy(), want_loss.numpy(), atol=1e-9, rtol=0)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), atol=1e-9, rtol=0)


@keras.saving.register_keras_serializable(package="keras_bn_tests")
class TiedLanguageModel(keras.Model):
    """An embedding and a head that shares its matrix; rebuilt from config."""

    def __init__(self, vocab, features, **kwargs):
        super().__init__(**kwargs)
        self.vocab, self.features = vocab, features
        self.embed = keras.layers.Embedding(vocab, features)
        self.mix = keras.layers.Dense(features, activation="tanh")
        self.head = LinearCrossEntropyHead(
            vocab, tied_embedding=self.embed, ignore_class=0, chunk_size=4
        )

    def call(self, inputs):
        if isinstance(inputs, (list, tuple)):
            tokens, labels = inputs
            return self.head([self.mix(self.embed(tokens)), labels])
        return self.head(self.mix(self.embed(inputs)))

    def get_config(self):
        return {**super().get_config(), "vocab": self.vocab, "features": self.features}


def test_tied_head_uses_the_embedding_and_survives_save_load(rng, tmp_path):
    x, y, w = data(rng, pad=0)
    model = TiedLanguageModel(VOCAB, FEATURES)
    model.compile(keras.optimizers.Adam(0.01), per_token_loss)
    first = model.fit([x, y], y, sample_weight=w, epochs=3, verbose=0).history["loss"]
    assert first[-1] < first[0]
    names = [v.path for v in model.trainable_variables]
    assert not any("kernel" in n and "linear_cross_entropy_head" in n for n in names)
    logits = model(x)
    expected = (
        np.tanh(
            model.embed.embeddings.numpy()[x] @ model.mix.kernel.numpy()
            + model.mix.bias.numpy()
        )
        @ model.embed.embeddings.numpy().T
        + model.head.bias.numpy()
    )
    np.testing.assert_allclose(logits.numpy(), expected, rtol=1e-5, atol=1e-5)
    path = tmp_path / "tied.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.head.tied_embedding is loaded.embed
    np.testing.assert_allclose(loaded(x).numpy(), logits.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        loaded([x, y]).numpy(), model([x, y]).numpy(), rtol=1e-6, atol=1e-7
    )


def test_functional_model_survives_save_load_and_predicts_logits(rng, tmp_path):
    x, y, _ = data(rng)
    model = fused_model(
        LinearCrossEntropyHead(VOCAB, name="head", label_smoothing=0.1, chunk_size=3)
    )
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    head = loaded.get_layer("head")
    assert (head.label_smoothing, head.chunk_size) == (0.1, 3)
    np.testing.assert_allclose(loaded([x, y]).numpy(), model([x, y]).numpy(), rtol=1e-6)
    # Inference: the same head on the hidden features gives Dense's logits.
    hidden = keras.Model(loaded.inputs[0], loaded.get_layer("mix").output)(x)
    dense = dense_twin(loaded)(x)
    np.testing.assert_allclose(
        head(hidden).numpy(), dense.numpy(), rtol=1e-5, atol=1e-6
    )


def test_padding_is_masked_out_of_the_mean(rng):
    x, y, _ = data(rng, pad=0)
    model = fused_model(LinearCrossEntropyHead(VOCAB, name="head", ignore_class=0))
    model.compile(loss=per_token_loss)
    per_token = model([x, y]).numpy()
    assert np.all(per_token[y == 0] == 0)
    evaluated = model.evaluate([x, y], y, batch_size=len(x), verbose=0)
    np.testing.assert_allclose(evaluated, per_token[y != 0].mean(), rtol=1e-5)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="units"):
        LinearCrossEntropyHead(0)
    with pytest.raises(ValueError, match="label_smoothing"):
        LinearCrossEntropyHead(5, label_smoothing=-1)
    with pytest.raises(TypeError, match="tied_embedding"):
        LinearCrossEntropyHead(5, tied_embedding="embed")
    with pytest.raises(TypeError, match="gradient_in_forward"):
        LinearCrossEntropyHead(5, gradient_in_forward="yes")
    with pytest.raises(ValueError, match="tied_embedding"):
        LinearCrossEntropyHead(5, tied_embedding=keras.layers.Embedding(4, 3))(
            tf.zeros([2, 3])
        )
    assert keras_bn.LinearCrossEntropyHead is LinearCrossEntropyHead


@pytest.mark.slow
def test_keras_hub_gpt2_backbone_trains_with_the_fused_head(rng):
    """A tiny GPT-2 from its constructor (nothing downloads), its token
    embedding tied to the head: `fit` runs and the loss falls."""
    keras_hub = pytest.importorskip("keras_hub")
    backbone = keras_hub.models.GPT2Backbone(
        vocabulary_size=VOCAB,
        num_layers=1,
        num_heads=2,
        hidden_dim=8,
        intermediate_dim=16,
        max_sequence_length=TOKENS,
    )
    token_ids = keras.Input((TOKENS,), dtype="int32")
    padding_mask = keras.Input((TOKENS,), dtype="int32")
    labels = keras.Input((TOKENS,), dtype="int32")
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    head = LinearCrossEntropyHead(
        VOCAB, tied_embedding=backbone.token_embedding, ignore_class=0
    )
    model = keras.Model([token_ids, padding_mask, labels], head([hidden, labels]))
    x, y, _ = data(rng, batch=16, pad=0)
    y[:, :-2] = x[:, 1:-1]  # next-token targets
    model.compile(keras.optimizers.Adam(0.01), per_token_loss)
    history = model.fit([x, np.ones_like(x), y], y, epochs=5, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
