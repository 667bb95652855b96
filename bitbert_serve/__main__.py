import sys

from bitbert_serve.cli import main

sys.exit(main())
