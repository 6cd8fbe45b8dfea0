"""Where the read-only ``shared/`` folder (reference bundle, official key list) is: beside the repository
(``../shared``), as in CI's fresh clone, else the development machine's ``/work/shared``."""
from pathlib import Path

_BESIDE = Path(__file__).resolve().parents[2] / "shared"
SHARED = _BESIDE if _BESIDE.is_dir() else Path("/work/shared")
REF = SHARED / "reference"
