"""Plain nn.Modules: towers, fusion and rankers (nothing here knows about distribution)."""

from trainer.models.fusion import ContentEncoder, QueryEncoder
from trainer.models.ranker import DlrmMlp, RankMixer, build_ranker
from trainer.models.towers import Encoded, TextTower, VisionTower, freeze_all_but_top

__all__ = [
    "ContentEncoder",
    "DlrmMlp",
    "Encoded",
    "QueryEncoder",
    "RankMixer",
    "TextTower",
    "VisionTower",
    "build_ranker",
    "freeze_all_but_top",
]
