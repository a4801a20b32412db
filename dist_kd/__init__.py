"""dist_kd: distributed knowledge distillation for BERT-family encoders (TinyBERT, MT-DNN-KD) on DeepSpeed."""

__version__ = "0.1.0"
