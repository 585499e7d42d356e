#!/usr/bin/env python3
"""Writes tokenomics/guard/needs_table.py: the needed and starting pieces of every pattern the
jailbreak detector runs (see tokenomics/guard/needs.py), which take longer to work out than the
rest of the detector takes to load. Run it after changing the lexicon or needs.py; a test says
when the table is out of date (a pattern missing from it is analysed at import, so the detector
stays exact either way, only slower to load).

    python3 tools/lexicon_needs.py
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokenomics.guard import jailbreak, needs  # noqa: E402

TARGET = ROOT / "tokenomics" / "guard" / "needs_table.py"


def render() -> str:
    data = needs.table(jailbreak._WINDOW_PATTERNS)
    assert '"""' not in data and "\\\n" not in data
    return ('"""What the jailbreak detector\'s patterns need (see needs.py), keyed by pattern_key.\n'
            'Written by tools/lexicon_needs.py; do not edit."""\n\n'
            f'TABLE = r"""{data}"""\n')


def main() -> int:
    TARGET.write_text(render(), encoding="utf-8")
    print(f"wrote {TARGET.relative_to(ROOT)} ({len(jailbreak._WINDOW_PATTERNS)} patterns)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
