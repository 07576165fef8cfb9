"""quantcli tune: the fastest model within an accuracy budget, searched per node."""
