// POSTs triggers the way a Spring RestClient on the JDK's HttpClient does, for tests/test_keepalive.py.
//
// Usage: java KeepAliveTriggers <base url> <connector id> <clients> <posts per client> <gaps in ms, comma-separated>
//
// Each client is one java.net.http.HttpClient (HTTP/1.1), so its POSTs share its pooled connection; after each
// response it sleeps the next gap (cycling through the list) before the next POST. No retry: a POST that fails is
// reported, as Spring reports it. One line per POST on stdout: `client=<i> post=<j> status=<code>` or
// `client=<i> post=<j> error=<exception>: <message>`.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;

public class KeepAliveTriggers {
    public static void main(String[] args) throws Exception {
        URI trigger = URI.create(args[0] + "/trigger");
        String body = "{\"connector_id\": \"" + args[1] + "\"}";
        int clients = Integer.parseInt(args[2]);
        int posts = Integer.parseInt(args[3]);
        String[] gapTexts = args[4].split(",");
        long[] gaps = new long[gapTexts.length];
        for (int k = 0; k < gaps.length; k++) {
            gaps[k] = Long.parseLong(gapTexts[k].trim());
        }
        List<Thread> threads = new ArrayList<>();
        for (int i = 0; i < clients; i++) {
            int client = i;
            Thread thread = new Thread(() -> postEvery(client, trigger, body, posts, gaps));
            threads.add(thread);
            thread.start();
        }
        for (Thread thread : threads) {
            thread.join();
        }
    }

    static void postEvery(int client, URI trigger, String body, int posts, long[] gaps) {
        HttpClient http = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(10)).build();
        for (int post = 0; post < posts; post++) {
            HttpRequest request = HttpRequest.newBuilder(trigger).timeout(Duration.ofSeconds(30))
                    .header("Content-Type", "application/json")
                    .POST(HttpRequest.BodyPublishers.ofString(body)).build();
            String outcome;
            try {
                outcome = "status=" + http.send(request, HttpResponse.BodyHandlers.ofString()).statusCode();
            } catch (Exception exc) {
                outcome = "error=" + exc.getClass().getName() + ": " + exc.getMessage();
            }
            synchronized (System.out) {
                System.out.println("client=" + client + " post=" + post + " " + outcome);
                System.out.flush();
            }
            if (post + 1 < posts) {
                try {
                    Thread.sleep(gaps[(client + post) % gaps.length]);
                } catch (InterruptedException exc) {
                    return;
                }
            }
        }
    }
}
