r"""Convert diffusers / transformers checkpoints to adm_jax, and export students back.

Import a whole pipeline folder (``unet/``, ``vae/``, ``text_encoder*/``, ``tokenizer*/``)::

  python -m adm_jax.convert --family=sdxl --src=/path/to/stable-diffusion-xl-base-1.0 \
      --dst=weights/stable-diffusion-xl-base-1.0

Export one converted component (e.g. a distilled UNet) as a diffusers folder::

  python -m adm_jax.convert --export --src=WORKDIR/student/unet --dst=out/unet

Only safetensors are read unless ``--allow_pickle`` is given (pickle can run code).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from absl import app, flags

from adm_jax import checkpoint, models
from adm_jax.convert import common

_FAMILY = flags.DEFINE_enum("family", "sdxl", list(models.FAMILIES), "Model family.")
_SRC = flags.DEFINE_string("src", None, "Source folder.")
_DST = flags.DEFINE_string("dst", None, "Destination folder.")
_COMPONENTS = flags.DEFINE_list("components", None,
                                "Subset of the family's components (default: all).")
_ALLOW_PICKLE = flags.DEFINE_bool("allow_pickle", False,
                                  "Also read .bin/.ckpt/.pt weights (pickle; can run code).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing outputs.")
_EXPORT = flags.DEFINE_bool("export", False, "Export an adm_jax component to diffusers.")

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenizer.json")


def convert_pipeline(family_name: str, src, dst, *, components=None, allow_pickle=False,
                     overwrite=False, log=print) -> list[Path]:
  """Converts every component (and copies the tokenizers) of a pipeline folder."""
  fam = models.family(family_name)
  src, dst = Path(src), Path(dst)
  if not src.is_dir():
    raise FileNotFoundError(f"source pipeline folder not found: {src}")
  names = components or list(fam.components)
  unknown = set(names) - set(fam.components)
  if unknown:
    raise ValueError(f"unknown component(s) {sorted(unknown)} for family {fam.name!r}; "
                     f"valid: {', '.join(fam.components)}")
  missing = [str(src / n) for n in names if not (src / n).is_dir()]
  if missing:
    raise FileNotFoundError(f"component folder(s) not found: {', '.join(missing)}")
  written = []
  for name in names:
    kind_name = fam.components[name]
    kind = models.KINDS[kind_name]
    cfg, _, params = kind.module().load(src / name, allow_pickle=allow_pickle)
    meta = dict(family=fam.name, component=name, kind=kind_name, config=kind.config_to(cfg),
                source=str(src / name))
    written.append(checkpoint.save_params(dst / name, params, meta, overwrite=overwrite))
    log(f"converted {src / name} -> {dst / name}")
  for tok in fam.tokenizers if components is None else ():
    if (src / tok).is_dir():
      (dst / tok).mkdir(parents=True, exist_ok=True)
      for f in TOKENIZER_FILES:
        if (src / tok / f).exists():
          shutil.copy2(src / tok / f, dst / tok / f)
      log(f"copied {src / tok} -> {dst / tok}")
  return written


def export_component(src, dst) -> Path:
  """Writes a converted component folder back in its diffusers / transformers layout."""
  meta = checkpoint.read_meta(src)
  kind = models.KINDS[meta["kind"]]
  cfg, _, params = models.load_component(src)
  return kind.module().export(cfg, params, dst)


def main(argv):
  del argv
  if not _SRC.value or not _DST.value:
    raise app.UsageError("--src and --dst are required")
  try:
    if _EXPORT.value:
      print(f"exported {_SRC.value} -> {export_component(_SRC.value, _DST.value)}")
    else:
      convert_pipeline(_FAMILY.value, _SRC.value, _DST.value, components=_COMPONENTS.value,
                       allow_pickle=_ALLOW_PICKLE.value, overwrite=_OVERWRITE.value)
  except (FileNotFoundError, FileExistsError, ValueError, common.ConversionError,
          checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
