"""Running calibrate and compare on a Ray cluster: `pip install "quantcli[ray]"`.

The data is split into parts that Ray tasks process on the nodes that read it; the driver
merges their exactly mergeable statistics (histograms, in-order block sums, exact metric
sums), so the result is the one a single process gives. `engine.map_ordered` is the
generic part: independent tasks, retried by Ray when a worker dies, results in order.

Ray is imported only when a cluster is asked for; calibrate/ and evaluate/ never import
this package (they stay plain and expose mergeable accumulators).
"""

from __future__ import annotations

from quantcli.cluster.config import ClusterConfig

__all__ = ["ClusterConfig"]
