"""The data stage: NIH-shaped dataset roots → checked, preprocessed images → shards → tf.data batches."""
