"""Open weight formats: HF transformers CLIPModel export and import, open_clip state-dict import.

Every converter checks that the architecture maps before it writes anything and raises `MappingError`
naming what does not (e.g. `model.vision.stem=conv`); a state dict converts only when every tensor finds
its place and none is left over.
"""
from vlpt.interop.common import Imported, MappingError, save_run
from vlpt.interop.hf import export_hf, import_hf, import_hf_state
from vlpt.interop.open_clip import import_open_clip

__all__ = ["Imported", "MappingError", "export_hf", "import_hf", "import_hf_state", "import_open_clip", "save_run"]
