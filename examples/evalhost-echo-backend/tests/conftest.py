"""Run from a checkout without installing: the package next to tests/ is imported first."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
