// A real Neo4j Community server for tests and for trying the pipeline against Neo4j without
// Docker: neo4j-harness starts it in this JVM with Bolt on a free 127.0.0.1 port and
// authentication on. The password is generated here, set through the system database, and
// written to an owner-only env file; it is never printed.
//
// Run by launcher.sh (which resolves the classpath with Maven) as a single-file program:
//   java -cp CLASSPATH Launcher.java DIR
// It prints one JSON line when Bolt answers, then serves until its standard input closes
// (the test run that started it has gone) or it is interrupted. The harness keeps its store
// in a folder of its own under DIR; launcher.sh removes DIR when it made it.

import java.io.IOException;
import java.net.InetSocketAddress;
import java.net.ServerSocket;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.StandardOpenOption;
import java.nio.file.attribute.PosixFilePermissions;
import java.security.SecureRandom;
import java.time.Duration;
import java.util.List;
import java.util.Map;

import inet.ipaddr.IPAddressString;

import org.neo4j.configuration.GraphDatabaseInternalSettings;
import org.neo4j.configuration.GraphDatabaseSettings;
import org.neo4j.configuration.connectors.BoltConnector;
import org.neo4j.configuration.connectors.HttpConnector;
import org.neo4j.configuration.helpers.SocketAddress;
import org.neo4j.graphdb.config.Setting;
import org.neo4j.harness.Neo4j;
import org.neo4j.harness.Neo4jBuilder;
import org.neo4j.harness.Neo4jBuilders;
import org.neo4j.kernel.internal.Version;

public class Launcher {
    public static void main(String[] args) throws Exception {
        if (args.length != 1) {
            System.err.println("usage: java -cp CLASSPATH Launcher.java DIR");
            System.exit(2);
        }
        Path dir = Path.of(args[0]).toAbsolutePath();
        Files.createDirectories(dir);
        int port = freePort();
        Neo4j neo4j = stopQuickly(Neo4jBuilders.newInProcessBuilder(dir))
                .withDisabledServer() // no HTTP: the pipeline speaks Bolt only
                .withConfig(BoltConnector.enabled, true)
                .withConfig(BoltConnector.listen_address, new SocketAddress("127.0.0.1", port))
                .withConfig(HttpConnector.enabled, false)
                .withConfig(GraphDatabaseSettings.auth_enabled, true)
                // As docker-compose.yml configures its Neo4j: LOAD CSV, a read to Neo4j that
                // READ access mode lets through, may open no local file and no URL (else a
                // read-only session reads /etc/passwd, or reaches any host from the server).
                .withConfig(GraphDatabaseSettings.allow_file_urls, false)
                .withConfig(GraphDatabaseInternalSettings.cypher_ip_blocklist,
                        List.of(new IPAddressString("0.0.0.0/0"), new IPAddressString("::/0")))
                // A test server: a small page cache, and no transaction runs past 10 minutes.
                .withConfig(GraphDatabaseSettings.pagecache_memory, 256L * 1024 * 1024)
                .withConfig(GraphDatabaseSettings.transaction_timeout, Duration.ofMinutes(10))
                .build();
        Runtime.getRuntime().addShutdownHook(new Thread(neo4j::close));

        String password = newPassword();
        // The embedded API runs with full access, so it can set the initial password that a
        // client would otherwise be forced to change on first login.
        neo4j.databaseManagementService().database("system").executeTransactionally(
                "ALTER USER neo4j SET PASSWORD $password CHANGE NOT REQUIRED",
                Map.of("password", password));
        String uri = "bolt://127.0.0.1:" + port;
        Path env = writeEnv(dir.resolve("neo4j.env"), uri, password);
        System.out.println("{\"uri\": \"" + uri + "\", \"user\": \"neo4j\", \"env_file\": \""
                + env + "\", \"version\": \"" + Version.getNeo4jVersion() + "\", \"pid\": "
                + ProcessHandle.current().pid() + "}");
        System.out.flush();

        // Serve until stdin closes: a test run that dies cannot leave this server behind.
        while (System.in.read() != -1) {
            // discard input
        }
        System.exit(0);
    }

    // Bolt's event loops wait a quiet period before they end (10 s a stop in all): a test
    // server has no client left to wait for. The settings are internal, and their type
    // changed between releases (seconds, then a Duration), so they are set where they exist.
    @SuppressWarnings("unchecked")
    static Neo4jBuilder stopQuickly(Neo4jBuilder builder) {
        for (String name : List.of("netty_server_shutdown_quiet_period",
                "netty_server_shutdown_timeout")) {
            try {
                Setting<Object> setting = (Setting<Object>)
                        GraphDatabaseInternalSettings.class.getField(name).get(null);
                boolean timeout = name.endsWith("timeout");
                Object value = setting.defaultValue() instanceof Duration
                        ? Duration.ofSeconds(timeout ? 2 : 0) : (Object) Integer.valueOf(timeout ? 2 : 0);
                builder = builder.withConfig(setting, value);
            } catch (ReflectiveOperationException | ClassCastException absent) {
                // another release: keep its defaults
            }
        }
        return builder;
    }

    static int freePort() throws IOException {
        try (ServerSocket socket = new ServerSocket()) {
            socket.bind(new InetSocketAddress("127.0.0.1", 0));
            return socket.getLocalPort();
        }
    }

    static String newPassword() {
        String alphabet = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
        SecureRandom random = new SecureRandom();
        StringBuilder out = new StringBuilder();
        for (int i = 0; i < 24; i++) {
            out.append(alphabet.charAt(random.nextInt(alphabet.length())));
        }
        return out.toString();
    }

    static Path writeEnv(Path path, String uri, String password) throws IOException {
        Files.deleteIfExists(path);
        Files.createFile(path, PosixFilePermissions.asFileAttribute(
                PosixFilePermissions.fromString("rw-------")));
        Files.writeString(path, "NEO4J_URI=" + uri + "\nNEO4J_USERNAME=neo4j\nNEO4J_PASSWORD="
                + password + "\n", StandardOpenOption.TRUNCATE_EXISTING);
        return path;
    }
}
