"""CLIP text encoder: parity with transformers 5, conversion round trips, error paths."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from adm_jax import tree  # noqa: E402
from adm_jax.convert import clip  # noqa: E402
from adm_jax.convert.common import ConversionError, write_safetensors  # noqa: E402
from adm_jax.models.clip_text import CLIPTextConfig  # noqa: E402

VOCAB = 1000
EOS = 997     # a "real" eos id; 998 also occurs in the ids, so argmax would pick wrongly
TOP = 999     # the highest id: the eos token of legacy (eos_token_id == 2) configs
TOL = 1e-4

CASES = [  # (with_projection, hidden_act, eos_token_id)
    (False, "quick_gelu", 2),
    (True, "gelu", EOS),
    (False, "gelu", EOS),
    (True, "quick_gelu", 2),
]


def _hf_model(with_projection, hidden_act, eos_token_id, seed=0):
  torch.manual_seed(seed)
  cfg = transformers.CLIPTextConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_attention_heads=4,
      num_hidden_layers=2, projection_dim=24, hidden_act=hidden_act,
      eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1)
  cls = (transformers.CLIPTextModelWithProjection if with_projection
         else transformers.CLIPTextModel)
  return cls(cfg).eval()


def _ids(batch, eos_token_id, seed):
  """Random ids with one end token per row at a random place, padded after it with the
  end token (rows 0, 2, ...) or with id 0 (rows 1, 3, ...), as CLIP's two tokenizers do."""
  rng = np.random.default_rng(seed)
  end = TOP if eos_token_id == 2 else EOS
  ids = rng.integers(1, EOS, size=(batch, 77))
  ids[:, 1::5] = 998 if end == EOS else 996
  ids[:, 0] = 0
  for b, pos in enumerate(rng.integers(2, 77, size=batch)):
    ids[b, pos] = end
    ids[b, pos + 1:] = end if b % 2 == 0 else 0
  return ids.astype(np.int32)


def _torch_outputs(model, ids):
  with torch.no_grad():
    o = model(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
  out = dict(last_hidden_state=o.last_hidden_state, penultimate=o.hidden_states[-2])
  if isinstance(model, transformers.CLIPTextModelWithProjection):
    out["text_embeds"] = o.text_embeds
  else:
    out["pooled"] = o.pooler_output
  return {k: v.numpy() for k, v in out.items()}


def _ours(graphdef, state, ids):
  return jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(ids))


def _assert_close(ours, ref):
  for k, v in ref.items():
    assert ours[k].shape == v.shape, k
    np.testing.assert_allclose(np.asarray(ours[k]), v, atol=TOL, rtol=0, err_msg=k)


@pytest.mark.parametrize("with_projection,hidden_act,eos", CASES)
def test_parity_with_transformers(tmp_path, with_projection, hidden_act, eos):
  model = _hf_model(with_projection, hidden_act, eos)
  model.save_pretrained(tmp_path)
  config, graphdef, state = clip.load(tmp_path)
  assert config.with_projection == with_projection and config.eos_token_id == eos
  for batch in (1, 3):
    ids = _ids(batch, eos, seed=batch)
    ours = _ours(graphdef, state, ids)
    _assert_close(ours, _torch_outputs(model, ids))
    if with_projection:  # pooled itself, via the projection-free inner model
      with torch.no_grad():
        pooled = model.text_model(torch.tensor(ids, dtype=torch.long)).pooler_output
      _assert_close(ours, {"pooled": pooled.numpy()})


def test_v5_key_names():
  """transformers 5 drops ``text_model.`` for CLIPTextModel, keeps it with projection."""
  for with_projection in (False, True):
    model = _hf_model(with_projection, "gelu", EOS)
    names = set(model.state_dict())
    config = CLIPTextConfig.from_hf(model.config.to_dict() | {
        "architectures": [type(model).__name__]})
    assert set(clip.key_table(config)) == names


def test_legacy_transformers4_naming(tmp_path):
  """``text_model.``-prefixed tensors plus a saved ``position_ids`` buffer load too."""
  model = _hf_model(False, "quick_gelu", 2)
  model.save_pretrained(tmp_path / "v5")
  sd = {f"text_model.{k}": v.numpy() for k, v in model.state_dict().items()}
  sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
  (tmp_path / "v4").mkdir()
  write_safetensors(tmp_path / "v4" / "model.safetensors", sd, {"format": "pt"})
  (tmp_path / "v4" / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
  _, _, s4 = clip.load(tmp_path / "v4")
  _, _, s5 = clip.load(tmp_path / "v5")
  f4, f5 = tree.flatten(s4), tree.flatten(s5)
  assert all(np.array_equal(f4[k], f5[k]) for k in f5)


@pytest.mark.parametrize("with_projection", [False, True])
def test_export_round_trip(tmp_path, with_projection):
  model = _hf_model(with_projection, "gelu" if with_projection else "quick_gelu",
                    EOS if with_projection else 2)
  model.save_pretrained(tmp_path / "src")
  config, graphdef, state = clip.load(tmp_path / "src")
  clip.export(config, state, tmp_path / "out")
  cls = type(model)
  back = cls.from_pretrained(tmp_path / "out").eval()
  ids = _ids(3, config.eos_token_id, seed=7)
  _assert_close(_ours(graphdef, state, ids), _torch_outputs(back, ids))
  ref, got = model.state_dict(), back.state_dict()
  assert set(ref) == set(got)
  assert all(torch.equal(ref[k], got[k]) for k in ref)
  config2, _, state2 = clip.load(tmp_path / "out")
  assert config2 == config
  f1, f2 = tree.flatten(state), tree.flatten(state2)
  assert set(f1) == set(f2)
  assert all(np.array_equal(np.asarray(f1[k]), np.asarray(f2[k])) for k in f1)


def test_bfloat16_compute(tmp_path):
  model = _hf_model(True, "gelu", EOS)
  model.save_pretrained(tmp_path)
  _, graphdef, state = clip.load(tmp_path, dtype=jnp.bfloat16)
  ids = _ids(2, EOS, seed=3)
  ours = _ours(graphdef, state, ids)
  assert ours["penultimate"].dtype == jnp.bfloat16
  ref = _torch_outputs(model, ids)
  np.testing.assert_allclose(np.asarray(ours["text_embeds"], np.float32), ref["text_embeds"],
                             atol=0.1)


def test_missing_folder(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    clip.load(missing)


def _rewrite(folder, change):
  from safetensors.numpy import load_file
  path = folder / "model.safetensors"
  tensors = load_file(str(path))
  change(tensors)
  write_safetensors(path, tensors, {"format": "pt"})


def test_extra_and_missing_tensor(tmp_path):
  _hf_model(True, "gelu", EOS).save_pretrained(tmp_path)
  _rewrite(tmp_path, lambda t: t.update(surprise=np.zeros(3, np.float32)))
  with pytest.raises(ConversionError, match="surprise"):
    clip.load(tmp_path)
  _rewrite(tmp_path, lambda t: (t.pop("surprise"),
                                t.pop("text_model.encoder.layers.1.mlp.fc2.bias")))
  with pytest.raises(ConversionError, match=r"text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
    clip.load(tmp_path)


def test_pickle_needs_opt_in(tmp_path):
  model = _hf_model(False, "gelu", EOS)
  model.save_pretrained(tmp_path)
  (tmp_path / "model.safetensors").unlink()
  torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(ConversionError, match="allow_pickle"):
    clip.load(tmp_path)
  _, graphdef, state = clip.load(tmp_path, allow_pickle=True)
  ids = _ids(1, EOS, seed=0)
  _assert_close(_ours(graphdef, state, ids), _torch_outputs(model, ids))


def test_config_round_trip_and_errors(tmp_path):
  model = _hf_model(True, "gelu", EOS)
  model.save_pretrained(tmp_path)
  hf = json.loads((tmp_path / "config.json").read_text())
  config = CLIPTextConfig.from_hf(hf)
  assert CLIPTextConfig.from_hf(config.to_hf()) == config
  assert transformers.CLIPTextConfig(**config.to_hf()).hidden_act == "gelu"
  with pytest.raises(ValueError, match="hidden_act"):
    CLIPTextConfig.from_hf(hf | {"hidden_act": "relu"})
  with pytest.raises(ValueError, match="architectures"):
    CLIPTextConfig.from_hf(hf | {"architectures": ["CLIPModel"]})
  with pytest.raises(ValueError, match="num_attention_heads"):
    CLIPTextConfig.from_hf(hf | {"num_attention_heads": 5})
  with pytest.raises(ValueError, match="eos_token_id"):
    CLIPTextConfig.from_hf(hf | {"eos_token_id": [1, 2]})
