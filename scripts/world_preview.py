"""Write one story-world narrative so a person can look at it: MP4, prompts/metadata JSON, PNG contact sheet
(tiny/preview.py)."""

import sys

from tiny.preview import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
