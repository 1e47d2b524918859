// Answers exactly like examples/hello (the path includes the query string),
// so workerd and Cordon do comparable work per request: read the method and
// path, format a small text body.
export default {
  async fetch(request) {
    const { pathname, search } = new URL(request.url);
    const body = `Hello from Cordon\nmethod: ${request.method}\npath: ${pathname}${search}\n`;
    return new Response(body, {
      headers: { "content-type": "text/plain; charset=utf-8" },
    });
  },
};
