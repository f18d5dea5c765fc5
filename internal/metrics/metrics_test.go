package metrics

import (
	"fmt"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
)

func text(t *testing.T, r *Registry) string {
	t.Helper()
	var b strings.Builder
	if err := r.WriteText(&b); err != nil {
		t.Fatalf("WriteText: %v", err)
	}
	return b.String()
}

func TestExposition(t *testing.T) {
	r := NewRegistry()
	builds := r.Counter("nix_offload_builds_total", "Builds finished, by machine and outcome.", "machine", "outcome")
	builds.With("root@b2:22", "success").Add(3)
	builds.With("root@b1:22", "failure").Inc()
	builds.With("root@b1:22", "success").Add(2.5)
	r.Counter("nix_offload_hook_requests_total", "Requests from nix-daemon.")        // no labels: shown at 0
	r.Gauge("nix_offload_unused", "A family without series is left out.", "machine") // never used
	running := r.Gauge("nix_offload_builds_running", "Builds running now.", "machine")
	running.With("root@b1:22").Set(2)
	running.With("root@b2:22").Dec()
	upload := r.Histogram("nix_offload_upload_seconds", "Time to copy a build's inputs.", []float64{0.1, 1, 10}, "machine")
	for _, v := range []float64{0.05, 0.1, 0.5, 20} {
		upload.With("root@b1:22").Observe(v)
	}
	upload.With("root@b2:22")
	r.GaugeFunc("nix_offload_slots_used", "Slots in use, read at each scrape.", func() []Sample {
		return []Sample{
			{Labels: []string{"root@b2:22"}, Value: 1},
			{Labels: []string{"root@b1:22"}, Value: 4},
		}
	}, "machine")
	r.GaugeFunc("nix_offload_up", "", func() []Sample { return []Sample{{Value: 1}} })

	const want = `# HELP nix_offload_builds_running Builds running now.
# TYPE nix_offload_builds_running gauge
nix_offload_builds_running{machine="root@b1:22"} 2
nix_offload_builds_running{machine="root@b2:22"} -1
# HELP nix_offload_builds_total Builds finished, by machine and outcome.
# TYPE nix_offload_builds_total counter
nix_offload_builds_total{machine="root@b1:22",outcome="failure"} 1
nix_offload_builds_total{machine="root@b1:22",outcome="success"} 2.5
nix_offload_builds_total{machine="root@b2:22",outcome="success"} 3
# HELP nix_offload_hook_requests_total Requests from nix-daemon.
# TYPE nix_offload_hook_requests_total counter
nix_offload_hook_requests_total 0
# HELP nix_offload_slots_used Slots in use, read at each scrape.
# TYPE nix_offload_slots_used gauge
nix_offload_slots_used{machine="root@b1:22"} 4
nix_offload_slots_used{machine="root@b2:22"} 1
# TYPE nix_offload_up gauge
nix_offload_up 1
# HELP nix_offload_upload_seconds Time to copy a build's inputs.
# TYPE nix_offload_upload_seconds histogram
nix_offload_upload_seconds_bucket{machine="root@b1:22",le="0.1"} 2
nix_offload_upload_seconds_bucket{machine="root@b1:22",le="1"} 3
nix_offload_upload_seconds_bucket{machine="root@b1:22",le="10"} 3
nix_offload_upload_seconds_bucket{machine="root@b1:22",le="+Inf"} 4
nix_offload_upload_seconds_sum{machine="root@b1:22"} 20.65
nix_offload_upload_seconds_count{machine="root@b1:22"} 4
nix_offload_upload_seconds_bucket{machine="root@b2:22",le="0.1"} 0
nix_offload_upload_seconds_bucket{machine="root@b2:22",le="1"} 0
nix_offload_upload_seconds_bucket{machine="root@b2:22",le="10"} 0
nix_offload_upload_seconds_bucket{machine="root@b2:22",le="+Inf"} 0
nix_offload_upload_seconds_sum{machine="root@b2:22"} 0
nix_offload_upload_seconds_count{machine="root@b2:22"} 0
`
	if got := text(t, r); got != want {
		t.Errorf("WriteText:\n%s\nwant:\n%s", got, want)
	}
}

func TestHistogramWithoutLabelsAndDefaultBuckets(t *testing.T) {
	r := NewRegistry()
	h := r.Histogram("d_seconds", "Durations.", nil).With()
	h.Observe(0.005) // on a bound: counted in it
	h.Observe(3)
	h.Observe(math.Inf(+1))
	got := text(t, r)
	for _, line := range []string{
		`d_seconds_bucket{le="0.005"} 1`,
		`d_seconds_bucket{le="2.5"} 1`,
		`d_seconds_bucket{le="5"} 2`,
		`d_seconds_bucket{le="10"} 2`,
		`d_seconds_bucket{le="+Inf"} 3`,
		`d_seconds_sum +Inf`,
		`d_seconds_count 3`,
	} {
		if !strings.Contains(got, "\n"+line+"\n") {
			t.Errorf("no line %q in\n%s", line, got)
		}
	}
	if n := strings.Count(got, "_bucket{"); n != len(defBuckets)+1 {
		t.Errorf("%d bucket lines, want %d", n, len(defBuckets)+1)
	}
	// A +Inf bound given explicitly is the implicit one, not a second.
	r.Histogram("e", "", []float64{1, math.Inf(+1)}).With().Observe(2)
	if got := text(t, r); !strings.HasSuffix(got, "e_bucket{le=\"1\"} 0\ne_bucket{le=\"+Inf\"} 1\ne_sum 2\ne_count 1\n") {
		t.Errorf("histogram with an explicit +Inf bound:\n%s", got)
	}
}

func TestEscaping(t *testing.T) {
	r := NewRegistry()
	c := r.Counter("esc_total", "A \"quoted\" help\\text\nover two lines.", "path", "other")
	c.With("C:\\nix\\store", "say \"hi\"\nbye").Inc()
	c.With("bad \xff byte", "").Inc()
	const want = `# HELP esc_total A "quoted" help\\text\nover two lines.
# TYPE esc_total counter
esc_total{path="C:\\nix\\store",other="say \"hi\"\nbye"} 1
esc_total{path="bad ` + "\uFFFD" + ` byte",other=""} 1
`
	if got := text(t, r); got != want {
		t.Errorf("WriteText:\n%s\nwant:\n%s", got, want)
	}
	// Invalid bytes are replaced before the series is looked up: both spellings are one series.
	c.With("bad \xfe byte", "").Inc()
	if got := c.With("bad \uFFFD byte", "").Value(); got != 2 {
		t.Errorf("series with replaced bytes: %v, want 2", got)
	}
}

func TestFloatFormat(t *testing.T) {
	for _, tc := range []struct {
		v    float64
		want string
	}{
		{0, "0"},
		{math.Copysign(0, -1), "0"},
		{1, "1"},
		{-1, "-1"},
		{1e6, "1000000"},
		{123456789012, "123456789012"},
		{1 << 53, "9007199254740992"},
		{-(1 << 53), "-9007199254740992"},
		{1 << 54, "1.8014398509481984e+16"},
		{1e300, "1e+300"},
		{2.5, "2.5"},
		{tenth() + 0.2, "0.30000000000000004"}, // at run time: constants would be exact
		{1e-7, "1e-07"},
		{math.NaN(), "NaN"},
		{math.Inf(+1), "+Inf"},
		{math.Inf(-1), "-Inf"},
	} {
		got := string(appendFloat(nil, tc.v))
		if got != tc.want {
			t.Errorf("appendFloat(%v) = %q, want %q", tc.v, got, tc.want)
		}
		if back, err := strconv.ParseFloat(got, 64); err != nil || (back != tc.v && !(math.IsNaN(back) && math.IsNaN(tc.v))) {
			t.Errorf("%q reads back as %v, %v; want %v", got, back, err, tc.v)
		}
	}
}

func TestGaugeOperations(t *testing.T) {
	g := NewRegistry().Gauge("g", "").With()
	g.Set(10)
	g.Add(-2.5)
	g.Inc()
	g.Dec()
	g.Dec()
	if got := g.Value(); got != 6.5 {
		t.Errorf("gauge = %v, want 6.5", got)
	}
	c := NewRegistry().Counter("c_total", "").With()
	c.Add(0)
	c.Add(0.25)
	c.Inc()
	if got := c.Value(); got != 1.25 {
		t.Errorf("counter = %v, want 1.25", got)
	}
}

func TestGaugeFuncBadSamples(t *testing.T) {
	r := NewRegistry()
	r.Counter("a_total", "").With().Inc()
	r.GaugeFunc("slots", "", func() []Sample {
		return []Sample{
			{Labels: []string{"b1"}, Value: 1},
			{Labels: []string{"b1", "extra"}, Value: 2},
			{Labels: []string{"b2"}, Value: 3},
			{Labels: []string{"b1"}, Value: 4},
		}
	}, "machine")
	r.Counter("z_total", "").With().Inc()
	var b strings.Builder
	err := r.WriteText(&b)
	if err == nil || !strings.Contains(err.Error(), "slots") || !strings.Contains(err.Error(), `2 label values ["b1" "extra"]`) ||
		!strings.Contains(err.Error(), `two samples with labels ["b1"]`) {
		t.Errorf("WriteText: err = %v, want both bad samples of slots named", err)
	}
	const want = "# TYPE a_total counter\na_total 1\n" +
		"# TYPE slots gauge\nslots{machine=\"b1\"} 1\nslots{machine=\"b2\"} 3\n" +
		"# TYPE z_total counter\nz_total 1\n"
	if b.String() != want {
		t.Errorf("WriteText wrote:\n%s\nwant the good samples and the other families:\n%s", b.String(), want)
	}
	// Nothing at all is not a mistake: the family is left out.
	r2 := NewRegistry()
	r2.GaugeFunc("none", "", func() []Sample { return nil })
	if got := text(t, r2); got != "" {
		t.Errorf("GaugeFunc with no samples wrote %q", got)
	}
}

// errWriter fails every write.
type errWriter struct{}

func (errWriter) Write([]byte) (int, error) { return 0, io.ErrClosedPipe }

func TestWriteTextReportsWriteErrors(t *testing.T) {
	r := NewRegistry()
	r.Counter("c_total", "").With().Inc()
	if err := r.WriteText(errWriter{}); err != io.ErrClosedPipe {
		t.Errorf("WriteText to a failing writer: %v", err)
	}
	// Big enough to be flushed part way.
	c := r.Counter("many_total", "", "i")
	for i := range 2000 {
		c.With(strconv.Itoa(i)).Inc()
	}
	var b strings.Builder
	if err := r.WriteText(&b); err != nil || strings.Count(b.String(), "\nmany_total{") != 2000 {
		t.Errorf("large WriteText: %v, %d series", err, strings.Count(b.String(), "\nmany_total{"))
	}
	if err := r.WriteText(errWriter{}); err != io.ErrClosedPipe {
		t.Errorf("large WriteText to a failing writer: %v", err)
	}
}

func TestMistakesPanic(t *testing.T) {
	for name, f := range map[string]func(r *Registry){
		"same name twice":          func(r *Registry) { r.Counter("x", ""); r.Gauge("x", "") },
		"histogram line taken":     func(r *Registry) { r.Counter("h_count", ""); r.Histogram("h", "", nil) },
		"name of a histogram line": func(r *Registry) { r.Histogram("h", "", nil); r.Gauge("h_bucket", "") },
		"GaugeFunc twice":          func(r *Registry) { r.Gauge("x", ""); r.GaugeFunc("x", "", func() []Sample { return nil }) },
		"empty name":               func(r *Registry) { r.Counter("", "") },
		"name with a dash":         func(r *Registry) { r.Counter("nix-offload", "") },
		"name starting with digit": func(r *Registry) { r.Gauge("1x", "") },
		"label with a colon":       func(r *Registry) { r.Gauge("x", "", "a:b") },
		"reserved label":           func(r *Registry) { r.Gauge("x", "", "__name__") },
		"empty label":              func(r *Registry) { r.Gauge("x", "", "") },
		"label twice":              func(r *Registry) { r.Counter("x", "", "m", "n", "m") },
		"le label":                 func(r *Registry) { r.Histogram("x", "", nil, "le") },
		"unsorted buckets":         func(r *Registry) { r.Histogram("x", "", []float64{1, 0.5}) },
		"repeated bucket":          func(r *Registry) { r.Histogram("x", "", []float64{1, 1}) },
		"NaN bucket":               func(r *Registry) { r.Histogram("x", "", []float64{math.NaN()}) },
		"-Inf bucket":              func(r *Registry) { r.Histogram("x", "", []float64{math.Inf(-1), 0}) },
		"too few label values":     func(r *Registry) { r.Counter("x", "", "m", "n").With("b1") },
		"too many label values":    func(r *Registry) { r.Gauge("x", "").With("b1") },
		"histogram label values":   func(r *Registry) { r.Histogram("x", "", nil, "m").With() },
		"counter going down":       func(r *Registry) { r.Counter("x", "").With().Add(-1) },
		"counter added NaN":        func(r *Registry) { r.Counter("x", "").With().Add(math.NaN()) },
		"GaugeFunc without func":   func(r *Registry) { r.GaugeFunc("x", "", nil) },
	} {
		t.Run(name, func(t *testing.T) {
			defer func() {
				p := recover()
				if p == nil {
					t.Fatal("no panic")
				}
				if s, ok := p.(string); !ok || !strings.HasPrefix(s, "metrics: ") {
					t.Errorf("panic %v, want a string starting with metrics:", p)
				}
			}()
			f(NewRegistry())
		})
	}
	// What is allowed must not panic.
	r := NewRegistry()
	r.Counter("ns:sub_total", "", "_private", "m2")
	r.Histogram("only_inf", "", []float64{math.Inf(+1)}).With().Observe(1)
	r.Histogram("negative_bounds", "", []float64{-1, 0, 1})
	if got := text(t, r); !strings.Contains(got, "only_inf_bucket{le=\"+Inf\"} 1\n") {
		t.Errorf("histogram with only +Inf:\n%s", got)
	}
}

func TestConcurrentUpdates(t *testing.T) {
	r := NewRegistry()
	c := r.Counter("c_total", "", "worker")
	total := r.Counter("total", "")
	g := r.Gauge("g", "")
	h := r.Histogram("h", "", []float64{1, 2}, "worker")
	const workers, each = 8, 2000

	stop := make(chan struct{})
	var scrapes sync.WaitGroup
	scrapes.Go(func() { // scrapes run while the values change
		for {
			select {
			case <-stop:
				return
			default:
			}
			if err := r.WriteText(io.Discard); err != nil {
				t.Error(err)
				return
			}
		}
	})
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			name := strconv.Itoa(w % 4) // two workers per series
			for i := range each {
				c.With(name).Inc()
				total.With().Add(0.5)
				g.With().Inc()
				h.With(name).Observe(float64(i % 3))
				g.With().Dec()
			}
		})
	}
	wg.Wait()
	close(stop)
	scrapes.Wait()

	got := text(t, r)
	for w := range 4 {
		for _, line := range []string{
			fmt.Sprintf(`c_total{worker="%d"} %d`, w, 2*each),
			// i%3 is 0, 1, 2 in turn: two thirds are ≤ 1, all are ≤ 2.
			fmt.Sprintf(`h_bucket{worker="%d",le="1"} %d`, w, 2*(each/3*2+each%3)),
			fmt.Sprintf(`h_bucket{worker="%d",le="2"} %d`, w, 2*each),
			fmt.Sprintf(`h_count{worker="%d"} %d`, w, 2*each),
			fmt.Sprintf(`h_sum{worker="%d"} %d`, w, 2*(each/3*3+1)),
		} {
			if !strings.Contains(got, "\n"+line+"\n") {
				t.Errorf("no line %q", line)
			}
		}
	}
	if !strings.Contains(got, fmt.Sprintf("\ntotal %d\n", workers*each/2)) || !strings.Contains(got, "\ng 0\n") {
		t.Errorf("lost updates:\n%s", got)
	}
}

func TestHandler(t *testing.T) {
	r := NewRegistry()
	r.Counter("requests_total", "Requests.").With().Add(7)
	h := r.Handler()

	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	want := "# HELP requests_total Requests.\n# TYPE requests_total counter\nrequests_total 7\n"
	if rec.Code != http.StatusOK || rec.Body.String() != want {
		t.Errorf("GET: %d %q, want 200 %q", rec.Code, rec.Body.String(), want)
	}
	if ct := rec.Header().Get("Content-Type"); ct != "text/plain; version=0.0.4; charset=utf-8" {
		t.Errorf("Content-Type %q", ct)
	}
	if cl := rec.Header().Get("Content-Length"); cl != strconv.Itoa(len(want)) {
		t.Errorf("Content-Length %q, want %d", cl, len(want))
	}

	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodHead, "/metrics", nil))
	if rec.Code != http.StatusOK || rec.Body.Len() != 0 || rec.Header().Get("Content-Length") != strconv.Itoa(len(want)) {
		t.Errorf("HEAD: %d, body %q, Content-Length %q", rec.Code, rec.Body.String(), rec.Header().Get("Content-Length"))
	}

	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/metrics", nil))
	if rec.Code != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != "GET, HEAD" {
		t.Errorf("POST: %d, Allow %q; want 405 and GET, HEAD", rec.Code, rec.Header().Get("Allow"))
	}

	r.GaugeFunc("broken", "", func() []Sample { return []Sample{{Labels: []string{"x"}}} })
	rec = httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/metrics", nil))
	if rec.Code != http.StatusInternalServerError || !strings.Contains(rec.Body.String(), "broken") || strings.Contains(rec.Body.String(), "requests_total") {
		t.Errorf("GET with a bad GaugeFunc: %d %q; want 500 and the error alone", rec.Code, rec.Body.String())
	}

	// Through a real server too: the scrape Prometheus makes.
	r2 := NewRegistry()
	r2.Gauge("up", "").With().Set(1)
	srv := httptest.NewServer(r2.Handler())
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != 200 || string(body) != "# TYPE up gauge\nup 1\n" {
		t.Errorf("scrape: %d %q %v", resp.StatusCode, body, err)
	}
}

func tenth() float64 { return 0.1 }
