"""CodeAlign (Linking Modality Isolation in Heterogeneous Collaborative Perception, CVPR
2026) for segmentation, as its authors' code (github:cxliu0314/CodeAlign) runs it:
modality groups that never share a frame (`split`), a model per group (stage 0), a
learned code space per group (`aligner`, `quantiser`, stage 1) and feature-to-code
translators between groups (`translator`, stage 2), in `stages` and `evaluate`."""
