"""Weight sharing beyond k-means: HashedNets (``hashed``) and soft weight sharing (``soft``)."""
