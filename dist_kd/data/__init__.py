"""Data pipelines: corpus shards (write + stream), task datasets, augmentation and Parquet stores."""
