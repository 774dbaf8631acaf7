import os
import sys

# One thread per process: the suite shares 2 cores with multi-process tests.
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
