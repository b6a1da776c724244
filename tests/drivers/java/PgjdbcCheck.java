// pgjdbc through pgrelay in transaction mode with prepareThreshold=1 (server-side named statements from the first
// execution). Several threads, each with its own connection, reusing PreparedStatements across transactions.
// Connection parameters come from PGHOST/PGPORT/PGUSER/PGPASSWORD/PGDATABASE. Exits non-zero on any mismatch.
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;
import java.util.concurrent.ConcurrentLinkedQueue;

public class PgjdbcCheck {
    static final int THREADS = 8;
    static final int ITERS = Integer.parseInt(env("CHECK_ITERS", "100"));
    static final ConcurrentLinkedQueue<String> failures = new ConcurrentLinkedQueue<>();

    static String env(String k, String d) {
        String v = System.getenv(k);
        return v == null || v.isEmpty() ? d : v;
    }

    static void fail(String m) {
        failures.add(m);
        System.err.println("FAIL: " + m);
    }

    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + env("PGHOST", "127.0.0.1") + ":" + env("PGPORT", "5432") + "/"
                + env("PGDATABASE", "postgres");
        Properties p = new Properties();
        p.setProperty("user", env("PGUSER", "postgres"));
        p.setProperty("password", env("PGPASSWORD", ""));
        p.setProperty("prepareThreshold", "1");
        p.setProperty("sslmode", "disable");
        return DriverManager.getConnection(url, p);
    }

    static void setup() throws SQLException {
        try (Connection c = connect(); Statement s = c.createStatement()) {
            s.execute("drop table if exists jdbc_counters, jdbc_items");
            s.execute("create table jdbc_counters(id int primary key, n int not null)");
            s.execute("insert into jdbc_counters select g, 0 from generate_series(0, " + (THREADS - 1) + ") g");
            s.execute("create table jdbc_items(client int, k int, v text, primary key (client, k))");
        }
    }

    static void worker(int id) {
        try (Connection c = connect()) {
            c.setAutoCommit(false);
            PreparedStatement inc = c.prepareStatement("update jdbc_counters set n = n + ? where id = ? returning n");
            PreparedStatement sel = c.prepareStatement("select ?::int * 3 + ?::int");
            PreparedStatement ins = c.prepareStatement("insert into jdbc_items(client, k, v) values (?, ?, ?)");
            for (int i = 1; i <= ITERS; i++) {
                inc.setInt(1, 1);
                inc.setInt(2, id);
                try (ResultSet rs = inc.executeQuery()) {
                    if (!rs.next() || rs.getInt(1) != i) {
                        fail("thread " + id + " iteration " + i + ": counter mismatch");
                        c.rollback();
                        return;
                    }
                }
                sel.setInt(1, i);
                sel.setInt(2, id);
                try (ResultSet rs = sel.executeQuery()) {
                    if (!rs.next() || rs.getInt(1) != i * 3 + id) {
                        fail("thread " + id + " iteration " + i + ": select mismatch");
                        c.rollback();
                        return;
                    }
                }
                c.commit();
            }
            // Batched inserts through one PreparedStatement, committed as one transaction.
            for (int k = 0; k < 50; k++) {
                ins.setInt(1, id);
                ins.setInt(2, k);
                ins.setString(3, "v" + id + "-" + k);
                ins.addBatch();
            }
            int[] counts = ins.executeBatch();
            c.commit();
            for (int n : counts) {
                if (n != 1) fail("thread " + id + ": batch update count " + n);
            }
            // Autocommit: every statement its own transaction, statements hop between servers.
            c.setAutoCommit(true);
            PreparedStatement agg = c.prepareStatement(
                    "select count(*), sum(k), string_agg(v, ',' order by k) from jdbc_items where client = ?");
            StringBuilder want = new StringBuilder();
            for (int k = 0; k < 50; k++) {
                if (k > 0) want.append(',');
                want.append("v").append(id).append("-").append(k);
            }
            for (int rep = 0; rep < 20; rep++) {
                agg.setInt(1, id);
                try (ResultSet rs = agg.executeQuery()) {
                    rs.next();
                    if (rs.getInt(1) != 50 || rs.getInt(2) != 1225 || !want.toString().equals(rs.getString(3))) {
                        fail("thread " + id + ": items " + rs.getInt(1) + " " + rs.getInt(2) + " " + rs.getString(3));
                        return;
                    }
                }
                sel.setInt(1, rep);
                sel.setInt(2, 0);
                try (ResultSet rs = sel.executeQuery()) {
                    if (!rs.next() || rs.getInt(1) != rep * 3) {
                        fail("thread " + id + ": autocommit select mismatch at " + rep);
                        return;
                    }
                }
            }
        } catch (Exception e) {
            fail("thread " + id + ": " + e);
        }
    }

    public static void main(String[] args) throws Exception {
        long t0 = System.currentTimeMillis();
        setup();
        List<Thread> ts = new ArrayList<>();
        for (int i = 0; i < THREADS; i++) {
            final int id = i;
            Thread t = new Thread(() -> worker(id));
            ts.add(t);
            t.start();
        }
        for (Thread t : ts) t.join();
        try (Connection c = connect(); Statement s = c.createStatement();
             ResultSet rs = s.executeQuery("select count(*), sum(n), min(n), max(n) from jdbc_counters")) {
            rs.next();
            if (rs.getInt(1) != THREADS || rs.getInt(2) != THREADS * ITERS || rs.getInt(3) != ITERS
                    || rs.getInt(4) != ITERS) {
                fail("final counters " + rs.getInt(1) + " " + rs.getInt(2) + " " + rs.getInt(3) + " " + rs.getInt(4));
            }
        }
        if (!failures.isEmpty()) {
            System.err.println("PgjdbcCheck: " + failures.size() + " failure(s)");
            System.exit(1);
        }
        System.out.printf("PgjdbcCheck: ok (%d threads x %d transactions, %.1fs)%n", THREADS, ITERS,
                (System.currentTimeMillis() - t0) / 1000.0);
    }
}
