"""Trainable tokens for Flax NNX: a few rows of an embedding table train in place of the table's own.

A targeted ``nnx.Embed`` keeps its ``embedding`` and gains, per adapter name, the values of the
selected rows (``embed_tokens/trainable_tokens_delta/default: [n_tokens, dim]``; PEFT's name,
although it holds the new rows, not a difference), as in HF PEFT 0.22.0
(``peft/tuners/trainable_tokens/layer.py``). Only those rows are trainable parameters, so the
gradient of the frozen table is never formed.

The forward looks ids up in the table and, where an id is a selected token, takes the adapter's
row instead; ``attend`` (an LM head tied to this embedding) uses the same rows, as PEFT ties the
head's adapter to the embedding's. ``merge`` writes the rows into the table (keeping the rows it
overwrote, for ``unmerge``).

On disk: ``base_model.model.<path>.trainable_tokens_delta`` for a ``TrainableTokensConfig``
adapter, ``<path>.token_adapter.trainable_tokens_delta`` for ``LoraConfig.trainable_token_indices``
(PEFT's ``TrainableTokensWrapper``); same layout as here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.tuners.base import AdapterDictLayer, AdapterLayer, AdapterParam, mixin_subclass

# where the rows sit in PEFT's file: a TrainableTokens adapter, or LoRA's trainable_token_indices wrapper
STANDALONE, WRAPPED = "trainable_tokens_delta", "token_adapter.trainable_tokens_delta"


class TokensCache(nnx.Variable):
    """The table rows a merge overwrote (not trained, not saved), for ``unmerge``."""


@dataclasses.dataclass(frozen=True)
class TokensSpec:
    """Static settings of one adapter on one embedding.

    Attributes:
      token_indices: the token ids whose rows the adapter holds, in its row order.
      file_suffix: the key suffix in PEFT's file (``STANDALONE`` or ``WRAPPED``).
    """

    token_indices: tuple[int, ...]
    file_suffix: str = STANDALONE


class TrainableTokensLayer(AdapterDictLayer):
    """Mixin marking a trainable-tokens embedding (``isinstance(m, TrainableTokensLayer)`` finds them)."""

    method_name = "trainable tokens"
    status_module_type = "TrainableTokensLayer"  # PEFT's layer class, whatever the embedding
    weight_dicts = ("trainable_tokens_delta",)
    cache_dicts = ("trainable_tokens_cache",)
    merge_cache_dicts = ("trainable_tokens_cache",)

    def _base_rows(self) -> jax.Array:
        """The layer's rows, one per token: ``[vocab, dim]``."""
        return self.embedding.get_value()

    def _set_base_rows(self, table: jax.Array) -> None:
        self.embedding.set_value(table)

    def add_tokens(self, name: str, spec: TokensSpec, key: jax.Array, init: bool = True) -> None:
        self._check_new(name)
        table = self._base_rows()
        index = jnp.asarray(spec.token_indices, jnp.int32)
        if init:
            rows = jnp.take(table, index, axis=0).astype(jnp.float32)
        else:  # PEFT: torch.randn in the table's dtype
            rows = jax.random.normal(key, (len(spec.token_indices), table.shape[1]), jnp.float32)
        self.trainable_tokens_delta[name] = AdapterParam(rows)
        self._add_spec(name, spec)

    def peft_layout(self, name: str):
        same = lambda v: v  # noqa: E731
        return {self.spec(name).file_suffix: (self.trainable_tokens_delta, same, same)}

    def _describe(self, name: str) -> str:
        return f"trainable tokens {list(self.spec(name).token_indices)}, [n_tokens, embedding_dim]"

    def _live_rows(self) -> list[tuple[jax.Array, jax.Array]]:
        """``(token ids, rows)`` of every adapter the forward applies, checked disjoint as PEFT checks."""
        live = self._live_adapters()
        seen: set[int] = set(i for n in self.adapter_merged for i in self.spec(n).token_indices)
        out = []
        for name, spec in live:
            if seen & set(spec.token_indices):
                raise ValueError(
                    f"Token indices of adapter {name} are already defined and would result in undefined merging "
                    "behavior. Only disjunct token indices are currently supported."
                )
            seen |= set(spec.token_indices)
            out.append((jnp.asarray(spec.token_indices, jnp.int32), self.trainable_tokens_delta[name].get_value()))
        return out

    def _table(self) -> jax.Array:
        """The embedding table with the live adapters' rows in place (what PEFT's forward builds)."""
        table = self._base_rows()
        for index, rows in self._live_rows():
            table = table.at[index].set(rows.astype(table.dtype))
        return table

    def __call__(self, inputs, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, *args, **kwargs)
        ids = jnp.asarray(inputs)
        for index, rows in self._live_rows():
            # the looked-up row where the id is a selected token: no [vocab, dim] table is rebuilt
            hit = ids[..., None] == index.reshape((1,) * ids.ndim + index.shape)
            row = jnp.take(rows, jnp.argmax(hit, axis=-1), axis=0).astype(y.dtype)
            y = jnp.where(jnp.any(hit, axis=-1)[..., None], row, y)
        return y

    def attend(self, query, out_sharding=None):
        if not self._live_adapters():
            return self._peftjax_base.attend(self, query, out_sharding=out_sharding)
        query, table = self.promote_dtype((query, self._table()), dtype=self.dtype)
        return jnp.dot(query, table.T, out_sharding=out_sharding)

    def merge_adapter(self, name: str) -> None:
        spec = self.spec(name)
        merged = set(i for n in self.adapter_merged for i in self.spec(n).token_indices)
        if merged & set(spec.token_indices):
            raise ValueError(
                f"Token indices of adapter {name} are already defined and would result in undefined merging "
                "behavior. Only disjunct token indices are currently supported."
            )
        table = self._base_rows()
        index = jnp.asarray(spec.token_indices, jnp.int32)
        self.trainable_tokens_cache[name] = TokensCache(jnp.take(table, index, axis=0))
        rows = self.trainable_tokens_delta[name].get_value().astype(table.dtype)
        self._set_base_rows(table.at[index].set(rows))
        self._mark_merged(name, True)

    def unmerge_adapter(self, name: str) -> None:
        table = self._base_rows()
        index = jnp.asarray(self.spec(name).token_indices, jnp.int32)
        self._set_base_rows(table.at[index].set(self.trainable_tokens_cache[name].get_value()))
        del self.trainable_tokens_cache[name]
        self._mark_merged(name, False)


class TrainableTokensOutputLayer(TrainableTokensLayer):
    """Trainable tokens on an untied LM head (an ``nnx.Linear`` without bias, PEFT's ``lm_head``):
    a token's row is the kernel's column for it (torch's weight row), and the adapter's rows give
    the selected tokens' logits (PEFT's forward: ``F.linear`` with the rows put in)."""

    def _base_rows(self) -> jax.Array:
        return self.kernel.get_value().T

    def _set_base_rows(self, table: jax.Array) -> None:
        self.kernel.set_value(table.T)

    def __call__(self, inputs, *args, **kwargs):
        y = self._peftjax_base.__call__(self, inputs, *args, **kwargs)
        for index, rows in self._live_rows():  # the selected tokens' logits only: no [dim, vocab] kernel rebuilt
            x, rows = self.promote_dtype((inputs, rows), dtype=self.dtype)
            y = y.at[..., index].set(jnp.dot(x, rows.T).astype(y.dtype))
        return y


def tokens_class_for(module: nnx.Module) -> type | None:
    """The trainable-tokens subclass of ``type(module)``; ``None`` unless it is an ``nnx.Embed``
    or a bias-free ``nnx.Linear`` (an untied LM head)."""
    if isinstance(module, TrainableTokensLayer):
        return type(module)
    if isinstance(module, AdapterLayer):
        return None
    if isinstance(module, nnx.Linear) and module.bias is None:
        return mixin_subclass(type(module), TrainableTokensOutputLayer, "TrainableTokens")
    if not isinstance(module, nnx.Embed):
        return None
    return mixin_subclass(type(module), TrainableTokensLayer, "TrainableTokens")
