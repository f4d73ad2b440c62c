"""Text conditioning: tokenizers, SDXL's two-encoder prompt embedding, micro-conditioning.

A conditioning is a plain dict pytree; for SDXL ``{"context": [B, 77, D1 + D2],
"pooled": [B, P], "time_ids": [B, 6]}``. Losses and guidance treat it as opaque: they
batch, slice and ``jax.tree.map`` it, and build the unconditional branch with
:func:`uncond_like`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from adm_jax.models.clip_text import CLIPTextModel

Array = jax.Array
Conditioning = dict[str, Array]

# Entries that the "force_zeros_for_empty_prompt" unconditional branch zeroes; everything
# else (SDXL's time_ids) is shared between the two branches, as in diffusers.
TEXT_KEYS = ("context", "pooled")
# Tokens per prompt of the CLIP text encoders (``model_max_length``).
MAX_LENGTH = 77


def load_tokenizer(path: str | Path):
  """A ``transformers.CLIPTokenizer`` from a local folder (``vocab.json`` + ``merges.txt``
  or ``tokenizer.json``), e.g. an SDXL ``tokenizer`` / ``tokenizer_2`` folder.

  Raises:
    FileNotFoundError: naming ``path`` when it is not a folder.
  """
  path = Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"tokenizer folder not found: {path}")
  from transformers import CLIPTokenizer  # Host-side only; kept out of module import.
  return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str]) -> np.ndarray:
  """Token ids as diffusers feeds CLIP: padded to and truncated at
  ``tokenizer.model_max_length``.

  Returns:
    ``np.int32`` ``[B, model_max_length]`` (``[B, 77]`` for CLIP).
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="np").input_ids
  return np.asarray(ids, dtype=np.int32)


def sdxl_add_time_ids(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                      target_size: tuple[int, int], batch: int) -> np.ndarray:
  """SDXL micro-conditioning ``original_size + crops_coords_top_left + target_size``
  (each ``(height, width)`` / ``(top, left)``), repeated over the batch.

  Returns:
    float32 ``[B, 6]``.
  """
  row = [*original_size, *crops_coords_top_left, *target_size]
  if len(row) != 6:
    raise ValueError(f"sdxl_add_time_ids: want three pairs, got {row}")
  return np.tile(np.asarray(row, np.float32)[None], (batch, 1))


def encode_sdxl(enc1: CLIPTextModel, enc2: CLIPTextModel, ids1: Array, ids2: Array, *,
                time_ids: Array | None = None) -> Conditioning:
  """SDXL prompt embedding (diffusers ``StableDiffusionXLPipeline.encode_prompt``).

  Args:
    enc1: ``text_encoder`` (CLIP ViT-L, no projection).
    enc2: ``text_encoder_2`` (OpenCLIP bigG, with projection).
    ids1: ``[B, 77]`` ids from ``tokenizer``.
    ids2: ``[B, 77]`` ids from ``tokenizer_2``.
    time_ids: Optional ``[B, 6]`` micro-conditioning (:func:`sdxl_add_time_ids`), stored
      under ``"time_ids"``.

  Returns:
    ``{"context": [B, 77, D1 + D2], "pooled": [B, P]}`` (plus ``"time_ids"``): the
    concatenated penultimate hidden states of both encoders and ``enc2``'s
    ``text_embeds``.
  """
  if not enc2.config.with_projection:
    raise ValueError("encode_sdxl: enc2 (text_encoder_2) must have a text_projection")
  out1 = enc1(jnp.asarray(ids1, jnp.int32))
  out2 = enc2(jnp.asarray(ids2, jnp.int32))
  context = jnp.concatenate([out1["penultimate"], out2["penultimate"].astype(
      out1["penultimate"].dtype)], axis=-1)           # [B, L, D1 + D2]
  cond = {"context": context, "pooled": out2["text_embeds"]}
  if time_ids is not None:
    cond["time_ids"] = jnp.asarray(time_ids, jnp.float32)
  return cond


def uncond_like(cond: Conditioning) -> Conditioning:
  """The unconditional branch of SDXL's ``force_zeros_for_empty_prompt``: zero
  ``context`` and ``pooled``; the other entries (``time_ids``) are kept as they are."""
  return {k: (jnp.zeros_like(v) if k in TEXT_KEYS else v) for k, v in cond.items()}
