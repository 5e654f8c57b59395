"""Vocabulary trimming: the input embedding table keeps only the rows of the tokens the task
uses, which is most of a small encoder's bytes (MiniLM's 30,522 x 384 table is half of its
parameters) and costs no time.

The tokens kept: every token the training split uses (at least ``min_count`` times) and every
special token of the tokenizer. The table becomes an ``IdMappedEmbedding``: a small lookup
(``id_map``: original token id -> row; int32 in memory, which every collective backend
broadcasts, and stored as int16 in the artifact when the rows fit) in front of an
ordinary nn.Embedding of the kept rows. A token that was not kept reads the kept row nearest
to its own embedding (cosine similarity: a word the training data never showed keeps roughly
its meaning, at no cost in bytes), or, with ``unseen: unknown``, the unknown token's row
(what a tokenizer that had never seen it would produce). The tokenizer
itself is unchanged, so the model takes raw text and every kept token is looked up exactly as
before; a later quantization stage finds the inner nn.Embedding like any other and can store
it at low bit width. The manifest entry records the table's shape; the id map is a tensor of
the artifact. Plain torch + transformers: no Ray, no DeepSpeed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from orchestrator.compress.common import ModuleRow, param_count
from orchestrator.compress.technique import Applied, Context, Technique, register
from orchestrator.config.compress import TechniqueConfig, TrimVocabConfig
from orchestrator.errors import ConfigError, Problem


class IdMappedEmbedding(nn.Module):
    """``inner(id_map[ids])``: an embedding of the kept rows behind a token-id lookup."""

    def __init__(self, inner: nn.Module, id_map: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("id_map", id_map)

    @property
    def num_embeddings(self) -> int:
        """The vocabulary size the tokenizer produces ids for (not the kept rows)."""
        return int(self.id_map.numel())

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.inner(self.id_map[input].long())

    def extra_repr(self) -> str:
        return f"vocab {self.num_embeddings} -> {self.id_map.max().item() + 1} rows"


def _table(model: nn.Module, key: str) -> tuple[str, nn.Embedding]:
    """The model's input embedding table and its name; ConfigError when it has none."""
    try:
        table = model.get_input_embeddings()
    # transformers' base class raises NotImplementedError for a model that does not say which
    # module is its input embedding; a plain nn.Module has no such method at all.
    except (AttributeError, NotImplementedError):
        table = None
    if not isinstance(table, nn.Embedding):
        raise ConfigError(
            Problem(
                key,
                "trim",
                f"{type(model).__name__} has no token embedding table to trim (a model that "
                "reads pixels, or one already trimmed)",
                "remove compress.vocab for this model",
            )
        )
    name = next(n for n, m in model.named_modules() if m is table)
    return name, table


@torch.no_grad()
def nearest_rows(weight: torch.Tensor, keep: list[int], chunk: int = 4096) -> torch.Tensor:
    """For every token id, the index (into ``keep``) of the kept row whose embedding is the
    most cosine-similar to its own (a kept token finds itself)."""
    w = torch.nn.functional.normalize(weight.float(), dim=-1)
    kept = w[torch.tensor(keep, device=w.device)]
    out = torch.empty(w.shape[0], dtype=torch.long)
    for start in range(0, w.shape[0], chunk):
        out[start : start + chunk] = (w[start : start + chunk] @ kept.T).argmax(-1).cpu()
    return out


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@register
class TrimVocab(Technique):
    config_type = TrimVocabConfig

    def select(
        self, model: nn.Module, cfg: TechniqueConfig, filter_fn: Any = None
    ) -> list[tuple[str, nn.Module]]:
        return [_table(model, "compress.vocab.method")]

    def apply_(self, model: nn.Module, cfg: TrimVocabConfig, ctx: Context) -> Applied:
        name, table = _table(model, "compress.vocab.method")
        tokenizer = ctx.tokenizer
        counts = ctx.token_counts() if ctx.token_counts is not None else None
        if counts is None or tokenizer is None:
            raise ConfigError(
                Problem(
                    "compress.vocab.method",
                    "trim",
                    "needs the token counts of the training split, and this job has no "
                    "tokenizer (a model that reads pixels)",
                    "remove compress.vocab",
                )
            )
        vocab = table.num_embeddings
        special = set(tokenizer.all_special_ids)
        keep = sorted(
            {t for t, c in counts.items() if c >= cfg.min_count and 0 <= t < vocab} | special
        )
        unknown = tokenizer.unk_token_id
        if unknown is None or unknown not in keep:
            raise ConfigError(
                Problem(
                    "compress.vocab.method",
                    "trim",
                    "the tokenizer has no unknown token to map the tokens that were not kept to",
                    "remove compress.vocab for this tokenizer",
                )
            )
        row_of = {t: i for i, t in enumerate(keep)}
        if cfg.unseen == "nearest":
            id_map = nearest_rows(table.weight.detach(), keep)
        else:
            id_map = torch.full((vocab,), row_of[unknown], dtype=torch.long)
        id_map[torch.tensor(keep)] = torch.arange(len(keep))
        inner = nn.Embedding(
            len(keep),
            table.embedding_dim,
            padding_idx=None if table.padding_idx is None else row_of.get(table.padding_idx),
            device=table.weight.device,
            dtype=table.weight.dtype,
        )
        with torch.no_grad():
            inner.weight.copy_(table.weight[torch.tensor(keep, device=table.weight.device)])
        inner.weight.requires_grad_(table.weight.requires_grad)
        _set(model, name, IdMappedEmbedding(inner, id_map.to(torch.int32)))
        row = ModuleRow(
            name=name,
            technique="vocab",
            kind="Embedding",
            shape_before=[vocab, table.embedding_dim],
            shape_after=[len(keep), table.embedding_dim],
            params_before=param_count(table),
            params_after=param_count(inner),
            details={
                "method": cfg.method,
                "kept": len(keep),
                "min_count": cfg.min_count,
                "unseen": cfg.unseen,
            },
        )
        entry = {"table": name, "vocab": vocab, "rows": len(keep), "dim": table.embedding_dim}
        return Applied([row], entry=entry)

    def rebuild_(self, model: nn.Module, cfg: TechniqueConfig, entry: dict[str, Any]) -> None:
        # Stand-ins of the recorded shapes: the saved weights and id map load into them.
        inner = nn.Embedding(int(entry["rows"]), int(entry["dim"]))
        id_map = torch.zeros(int(entry["vocab"]), dtype=torch.int32)
        _set(model, entry["table"], IdMappedEmbedding(inner, id_map))

    def note(self, cfg: TechniqueConfig) -> str:
        fallback = "the nearest kept row" if cfg.unseen == "nearest" else "the unknown token's row"
        return (
            "vocabulary trimming: the embedding table keeps only the rows of the tokens the "
            "training split uses (bytes saved for real, no time cost); the tokenizer is "
            f"unchanged, other tokens read {fallback}"
        )
