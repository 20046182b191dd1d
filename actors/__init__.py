"""Ray side: the shard runner, the stage engine and the stages that run pipeline functions over shards
of a corpus, reading and writing through storage."""
