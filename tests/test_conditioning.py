"""SDXL conditioning: prompt -> {context, pooled, time_ids} parity with diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

from adm_jax import conditioning  # noqa: E402
from adm_jax.convert import clip  # noqa: E402
from flax import nnx  # noqa: E402
import tiny_sdxl  # noqa: E402
from tiny_sdxl import write_tokenizer as _write_tokenizer  # noqa: E402

TOL = 1e-4
PROMPTS = [
    "a photo of a cat",
    "A blue dog, sitting on the red mat!",
    " ".join(["an astronaut riding a horse"] * 20),   # > 77 tokens: truncated
]


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
  """Tiny SDXL text path: two tokenizers, torch encoders and our converted encoders."""
  root = tmp_path_factory.mktemp("sdxl")
  n = _write_tokenizer(root / "tokenizer", "<|endoftext|>")
  _write_tokenizer(root / "tokenizer_2", "!")
  tok1 = conditioning.load_tokenizer(root / "tokenizer")
  tok2 = conditioning.load_tokenizer(root / "tokenizer_2")
  eos = tok1.eos_token_id
  assert eos == n - 1 and tok2.pad_token_id == 0
  torch.manual_seed(0)
  # As SDXL: text_encoder has the legacy eos_token_id 2, text_encoder_2 the real one.
  te1, te2 = tiny_sdxl.text_encoders(eos)
  te1.save_pretrained(root / "text_encoder")
  te2.save_pretrained(root / "text_encoder_2")
  _, g1, s1 = clip.load(root / "text_encoder")
  _, g2, s2 = clip.load(root / "text_encoder_2")
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=None, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1, tokenizer_2=tok2,
      unet=None, scheduler=None, force_zeros_for_empty_prompt=True)
  return dict(tok1=tok1, tok2=tok2, enc1=nnx.merge(g1, s1), enc2=nnx.merge(g2, s2),
              pipe=pipe)


def test_load_tokenizer_missing(tmp_path):
  missing = tmp_path / "no_tokenizer"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    conditioning.load_tokenizer(missing)


def test_tokenize(sdxl):
  tok = sdxl["tok2"]
  ids = conditioning.tokenize(tok, PROMPTS)
  assert ids.dtype == np.int32 and ids.shape == (3, 77)
  ref = tok(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(ids, np.asarray(ref))
  assert ids[2, -1] == tok.eos_token_id                       # truncated, eos kept
  assert (ids[0] == tok.eos_token_id).sum() == 1 and ids[0, -1] == 0  # padded with "!"
  np.testing.assert_array_equal(conditioning.tokenize(tok, PROMPTS[0]), ids[:1])


def test_sdxl_add_time_ids():
  t = conditioning.sdxl_add_time_ids((1024, 768), (0, 16), (1024, 1024), batch=3)
  assert t.dtype == np.float32 and t.shape == (3, 6)
  np.testing.assert_array_equal(t, np.tile([[1024, 768, 0, 16, 1024, 1024]], (3, 1)))


@pytest.mark.parametrize("batch", [1, 3])
def test_encode_sdxl_matches_diffusers(sdxl, batch):
  prompts = PROMPTS[:batch]
  with torch.no_grad():
    pe, npe, pp, npp = sdxl["pipe"].encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True)
  ids1 = conditioning.tokenize(sdxl["tok1"], prompts)
  ids2 = conditioning.tokenize(sdxl["tok2"], prompts)
  time_ids = conditioning.sdxl_add_time_ids((64, 64), (0, 0), (64, 64), batch)
  encode = nnx.jit(conditioning.encode_sdxl)
  cond = encode(sdxl["enc1"], sdxl["enc2"], ids1, ids2, time_ids=time_ids)
  assert set(cond) == {"context", "pooled", "time_ids"}
  assert cond["context"].shape == (batch, 77, 32 + 48) and cond["pooled"].shape == (batch, 40)
  np.testing.assert_allclose(np.asarray(cond["context"]), pe.numpy(), atol=TOL, rtol=0)
  np.testing.assert_allclose(np.asarray(cond["pooled"]), pp.numpy(), atol=TOL, rtol=0)

  uncond = conditioning.uncond_like(cond)
  assert jax.tree.structure(uncond) == jax.tree.structure(cond)
  np.testing.assert_array_equal(np.asarray(uncond["context"]), npe.numpy())
  np.testing.assert_array_equal(np.asarray(uncond["pooled"]), npp.numpy())
  np.testing.assert_array_equal(np.asarray(uncond["time_ids"]), time_ids)


def test_encode_sdxl_without_time_ids_and_bad_enc2(sdxl):
  ids = conditioning.tokenize(sdxl["tok1"], PROMPTS[:1])
  cond = conditioning.encode_sdxl(sdxl["enc1"], sdxl["enc2"], ids, ids)
  assert set(cond) == {"context", "pooled"}
  assert jnp.all(conditioning.uncond_like(cond)["pooled"] == 0)
  with pytest.raises(ValueError, match="text_projection"):
    conditioning.encode_sdxl(sdxl["enc1"], sdxl["enc1"], ids, ids)
