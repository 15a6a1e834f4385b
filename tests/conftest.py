import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never download; a hub lookup would only burn ~30 s on DNS retries
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
