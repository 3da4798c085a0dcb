"""Losses computed the way transformers computes them for each head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

IGNORE_INDEX = -100


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean next-token cross entropy; label ``-100`` is ignored (labels are not pre-shifted)."""
    logits = logits[:, :-1].astype(jnp.float32)
    labels = labels[:, 1:]
    return masked_cross_entropy(logits, labels)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross entropy over the positions whose label is not ``-100``."""
    valid = labels != IGNORE_INDEX
    per_token = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), jnp.where(valid, labels, 0)
    )
    return jnp.sum(per_token * valid) / jnp.maximum(jnp.sum(valid), 1)


def check_span_labels(model, config) -> None:
    """A question-answering head's ``num_labels`` must be 2: a start and an end logit per token."""
    if config.num_labels != 2:
        raise ValueError(f"{type(model).__name__} needs num_labels=2 (a start and an end logit per token), "
                         f"got {config.num_labels}: pass num_labels=2")


def span_loss(start_logits: jax.Array, end_logits: jax.Array, start_positions, end_positions) -> jax.Array:
    """Extractive question answering's loss as transformers computes it: each row's start and end
    token positions, clamped to ``[0, seq]``, scored by the cross entropy of the start and of the
    end logits ``[batch, seq]`` (a position at ``seq``, an answer cut off by truncation, counts in
    neither mean), and the two means averaged."""
    seq = start_logits.shape[-1]

    def scored(positions):
        positions = jnp.clip(jnp.asarray(positions).reshape(-1), 0, seq)
        return jnp.where(positions == seq, IGNORE_INDEX, positions)

    return (masked_cross_entropy(start_logits, scored(start_positions))
            + masked_cross_entropy(end_logits, scored(end_positions))) / 2


def token_labels_loss(logits: jax.Array, labels) -> jax.Array | None:
    """A token classifier's loss as transformers computes it: the mean cross entropy of
    ``[batch, seq, classes]`` logits over the labelled tokens (``labels`` ``[batch, seq]``, -100
    where none counts); ``None`` without labels."""
    if labels is None:
        return None
    return masked_cross_entropy(logits.reshape(-1, logits.shape[-1]), jnp.asarray(labels).reshape(-1))


def span_outputs(logits: jax.Array, start_positions=None, end_positions=None) -> dict:
    """A question-answering head's ``[batch, seq, 2]`` logits as ``start_logits``, ``end_logits``
    and ``loss`` (:func:`span_loss` when both positions are given, else ``None``): the fields of
    its ``ModelOutput``."""
    start_logits, end_logits = logits[..., 0], logits[..., 1]
    loss = None
    if start_positions is not None and end_positions is not None:
        loss = span_loss(start_logits, end_logits, start_positions, end_positions)
    return dict(start_logits=start_logits, end_logits=end_logits, loss=loss)


def sequence_classification_loss(logits: jax.Array, labels: jax.Array, config) -> jax.Array:
    """Regression, single-label or multi-label loss, chosen as transformers chooses it."""
    logits = logits.astype(jnp.float32)
    problem = getattr(config, "problem_type", None)
    if problem is None:
        if config.num_labels == 1:
            problem = "regression"
        elif jnp.issubdtype(labels.dtype, jnp.integer):
            problem = "single_label_classification"
        else:
            problem = "multi_label_classification"
    if problem == "regression":
        return jnp.mean((jnp.squeeze(logits) - jnp.squeeze(labels).astype(jnp.float32)) ** 2)
    if problem == "single_label_classification":
        return masked_cross_entropy(logits, labels.reshape(-1))
    return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)))


# Tokens per chunk of the fused loss: a chunk's logits are at most this many elements (32 MiB in
# float32), whatever the vocabulary.
FUSED_CHUNK_ELEMENTS = 1 << 23


def causal_lm_loss_from_hidden(
    hidden: jax.Array, kernel: jax.Array, labels: jax.Array, *, chunk_tokens: int | None = None
) -> jax.Array:
    """:func:`causal_lm_loss` of ``hidden @ kernel``, without ever holding the whole logits.

    The output projection and the cross entropy run chunk by chunk over the tokens; the forward
    pass also computes the loss's gradient with respect to ``hidden`` (and ``kernel``, only when
    it is differentiated), so the backward pass needs neither the logits nor a recomputation.
    A causal LM's ``[tokens, vocab]`` logits, their softmax and their gradient are the largest
    buffers of a LoRA training step; this keeps one chunk of them alive at a time, for the
    same FLOPs.

    Args:
      hidden: ``[batch, seq, hidden]`` final hidden states.
      kernel: ``[hidden, vocab]`` output projection (an ``nnx.Linear`` kernel, or an embedding
        matrix transposed), in the compute dtype.
      labels: ``[batch, seq]`` token ids, not pre-shifted; ``-100`` is ignored.
      chunk_tokens: tokens per chunk (default: ``FUSED_CHUNK_ELEMENTS // vocab``).

    >>> h, w = jnp.ones((2, 5, 8)), jnp.ones((8, 11))
    >>> labels = jnp.zeros((2, 5), jnp.int32)
    >>> bool(jnp.allclose(causal_lm_loss_from_hidden(h, w, labels), causal_lm_loss(h @ w, labels)))
    True
    """
    b, s, d = hidden.shape
    shifted = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    flat_h, flat_y = hidden.reshape(b * s, d), shifted.reshape(b * s).astype(jnp.int32)
    n = b * s
    chunk = min(chunk_tokens or max(1, FUSED_CHUNK_ELEMENTS // kernel.shape[-1]), n)
    chunk = -(-n // -(-n // chunk))  # as many chunks, as even as possible: little padding
    pad = -n % chunk
    if pad:
        flat_h = jnp.pad(flat_h, ((0, pad), (0, 0)))
        flat_y = jnp.pad(flat_y, (0, pad), constant_values=IGNORE_INDEX)
    count = jnp.sum(flat_y != IGNORE_INDEX)
    total = _nll_sum(flat_h.reshape(-1, chunk, d), kernel, flat_y.reshape(-1, chunk))
    return total / jnp.maximum(count, 1).astype(jnp.float32)


def _chunked_nll(h, w, y, want_dh: bool, want_dw: bool):
    """``(sum of NLL, d sum / d h, d sum / d w)`` over chunks ``h [c, t, d]``, ``y [c, t]``."""

    def body(dw, xs):
        hc, yc = xs
        logits = jnp.dot(hc, w, preferred_element_type=jnp.float32)
        valid = yc != IGNORE_INDEX
        safe = jnp.where(valid, yc, 0)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, safe[:, None], axis=-1)[:, 0]
        nll = jnp.sum(jnp.where(valid, lse - picked, 0.0))
        if not (want_dh or want_dw):
            return dw, (nll, None)
        # d nll / d logits = softmax - onehot, on valid rows; in the kernel's dtype as autodiff would.
        # One element-wise pass over the logits, which XLA writes in their place: a scatter of the
        # -1s kept both [t, vocab] arrays alive (64 instead of 32 MiB at 256 tokens x 32000)
        onehot = jnp.arange(logits.shape[-1])[None, :] == safe[:, None]
        g = jnp.where(valid[:, None], jnp.exp(logits - lse[:, None]) - onehot, 0.0).astype(w.dtype)
        dh = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(h.dtype) if want_dh else None
        if want_dw:
            dw = dw + jnp.dot(hc.T, g, preferred_element_type=jnp.float32)
        return dw, (nll, dh)

    dw0 = jnp.zeros(w.shape, jnp.float32) if want_dw else None
    # a rolled loop: unrolled, XLA's scheduler keeps every chunk's logits alive at once. (XLA's
    # cost analysis counts a loop body once: count FLOPs with a single chunk.)
    dw, (nll, dh) = jax.lax.scan(body, dw0, (h, y))
    return jnp.sum(nll), dh, (None if dw is None else dw.astype(w.dtype))


@jax.custom_vjp
def _nll_sum(h, w, y):
    return _chunked_nll(h, w, y, False, False)[0]


def _nll_sum_fwd(h, w, y):
    # symbolic zeros: ``perturbed`` says whether an input is differentiated (a frozen lm_head is not)
    total, dh, dw = _chunked_nll(h.value, w.value, y.value, h.perturbed, w.perturbed)
    return total, (dh, dw)


def _nll_sum_bwd(residuals, g):
    dh, dw = residuals
    scale = lambda d: None if d is None else (g * d.astype(jnp.float32)).astype(d.dtype)  # noqa: E731
    return scale(dh), scale(dw), None


_nll_sum.defvjp(_nll_sum_fwd, _nll_sum_bwd, symbolic_zeros=True)


def output_kernel(lm_head, embed_tokens) -> jax.Array | None:
    """The ``[hidden, vocab]`` kernel (compute dtype) of a plain output projection, else ``None``.

    ``lm_head`` is an ``nnx.Linear`` without bias, or ``None`` when the embeddings are tied
    (``embed_tokens.attend``). A layer that carries adapters or other extras is not plain:
    its loss must go through its own ``__call__``.
    """
    from flax import nnx

    from peftjax.models._gemma2 import ScaledEmbed  # scales its lookups only: its attend is nnx.Embed's

    if lm_head is None:
        if type(embed_tokens) not in (nnx.Embed, ScaledEmbed):
            return None
        w = embed_tokens.embedding.get_value().T
        return w.astype(embed_tokens.dtype or w.dtype)
    if type(lm_head) is not nnx.Linear or lm_head.bias is not None or lm_head.precision is not None:
        return None
    w = lm_head.kernel.get_value()
    return w.astype(lm_head.dtype or w.dtype)


def causal_lm_head_loss(hidden: jax.Array, logits: jax.Array, labels: jax.Array, lm_head, embed_tokens) -> jax.Array:
    """A causal LM's loss, fused with a plain output projection when traced.

    Under ``jit`` or ``grad`` it is :func:`causal_lm_loss_from_hidden`: the logits the model
    returns beside the loss are then dead code unless the caller uses them too (which costs one
    more forward projection, not memory). Called eagerly, the logits already exist and are used.
    """
    kernel = output_kernel(lm_head, embed_tokens)
    if kernel is None or not isinstance(hidden, jax.core.Tracer):
        return causal_lm_loss(logits, labels)
    return causal_lm_loss_from_hidden(hidden.astype(kernel.dtype), kernel, labels)


def pool_last_token(logits: jax.Array, input_ids, pad_token_id: int | None) -> jax.Array:
    """Each row's logits at its last non-pad token, as transformers' decoder classifiers pool.

    Raises:
      ValueError: ``pad_token_id`` is unset and the batch has more than one row.
    """
    b, s = logits.shape[:2]
    if pad_token_id is None and b != 1:
        raise ValueError("config.pad_token_id must be set to classify batches of more than one sequence")
    if pad_token_id is None or input_ids is None:
        last = jnp.full((b,), s - 1)
    else:
        not_pad = jnp.asarray(input_ids) != pad_token_id
        last = jnp.argmax(jnp.arange(s)[None, :] * not_pad, axis=-1)
    return logits[jnp.arange(b), last]


def pool_last_token_of_segments(logits: jax.Array, input_ids, pad_token_id: int | None, segment_ids,
                                segment_starts) -> jax.Array:
    """Each packed sequence's logits at its last non-pad token: what :func:`pool_last_token` gives
    the sequence in a row of its own. ``segment_ids`` (``[batch, seq]``) is ``k + 1`` on the tokens
    of the batch's ``k``-th sequence, ``segment_starts`` (``[n]``) the flat index of each one's
    first token; a sequence absent from the batch (its filler rows) reads its start.

    Raises:
      ValueError: ``pad_token_id`` is unset and the batch has more than one sequence.
    """
    n = segment_starts.shape[0]
    if pad_token_id is None and n != 1:
        raise ValueError("config.pad_token_id must be set to classify batches of more than one sequence")
    flat = logits.reshape(-1, logits.shape[-1])
    segment = jnp.asarray(segment_ids).reshape(-1)
    keep = segment > 0
    if pad_token_id is not None and input_ids is not None:
        keep = keep & (jnp.asarray(input_ids).reshape(-1) != pad_token_id)
    index = jnp.arange(segment.shape[0])
    last = jax.ops.segment_max(jnp.where(keep, index, -1), jnp.where(segment > 0, segment - 1, n),
                               num_segments=n + 1)[:n]
    return flat[jnp.where(last < 0, jnp.asarray(segment_starts), last)]
