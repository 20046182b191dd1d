"""Query side, without Ray: encode a query like the database, open published indexes, search and re-rank.
``jobs.search``, the results browser and the benchmark all rank through :class:`service.search.SearchService`."""
