// POSTs one trigger in a trace, the way a Spring Boot service with Micrometer Tracing does: a `traceparent` header
// naming the caller's trace and its current span, for tests/test_tracing.py.
//
// Usage: java TracedTrigger <base url> <traceparent> <json body>
//
// One JDK java.net.http.HttpClient (HTTP/1.1). Prints `status=<code>` on the first line, the response body after.
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class TracedTrigger {
    public static void main(String[] args) throws Exception {
        HttpClient http = HttpClient.newBuilder().version(HttpClient.Version.HTTP_1_1)
                .connectTimeout(Duration.ofSeconds(10)).build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(args[0] + "/trigger")).timeout(Duration.ofSeconds(60))
                .header("Content-Type", "application/json")
                .header("traceparent", args[1])
                .POST(HttpRequest.BodyPublishers.ofString(args[2])).build();
        HttpResponse<String> response = http.send(request, HttpResponse.BodyHandlers.ofString());
        System.out.println("status=" + response.statusCode());
        System.out.println(response.body());
    }
}
