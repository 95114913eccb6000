import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import toy_quantizers  # noqa: F401  (registers the toy methods)
