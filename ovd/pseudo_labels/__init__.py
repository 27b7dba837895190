"""Image-level labels from captions (:mod:`ovd.pseudo_labels.captions`) and pseudo boxes mined for them with the CLIP
teacher (:mod:`ovd.pseudo_labels.miner`), DESIGN §2 PIS.

Nothing is re-exported here: the caption matcher is pure Python, and importing it should not pull in torch.
"""
