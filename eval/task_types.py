"""How just_eval's task labels (written by GPT-4, multi-label) map to Signalbox's task types.

Documented in eval/README.md; the classifier is trained and measured on them in
eval/train_classifier.py (held-out folds).
"""

from __future__ import annotations

LABEL_MAP = {
    "info-seek": "qa",
    "reasoning": "reasoning",
    "procedure": "qa",
    "writing": "creative",
    "coding": "code",
    "role-play": "chat",
    "math": "math",
}
