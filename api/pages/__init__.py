"""What the `/ui/…` pages show, apart from their routes (`api.routers.ui`): the templates and the
headers every page is sent with (`rendering`), the filters that format values for people
(`formats`), and the view models built from stored plans, probes and jobs (`plans`, `jobs`). The
snippets that apply a plan are the domain's, `tuner.integrations.snippets`."""
