-- wrk script for the sql-select workload: every request POSTs the same
-- point query, `{"sql": "SELECT ... WHERE id = ?", "params": [ID]}`.
--
-- run.sh sets BINDINGS_SQL_BODY to that JSON body, for both servers alike;
-- the target (`/sql?binding=...`) comes from the URL given to wrk.

wrk.method = "POST"
wrk.body = os.getenv("BINDINGS_SQL_BODY") or error("BINDINGS_SQL_BODY is not set")
wrk.headers["Content-Type"] = "application/json"
